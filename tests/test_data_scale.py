"""Data at scale, launched: a 2 GB token file trains in the memory of a small one, a cached 300k-row CSV in the
memory of a 1k-row one (one launched process each: a rank's memory is what is measured, and every rank maps
the same files), and packed blocks give the same model under every split."""

from __future__ import annotations

import pytest

from launcher.config import DataConfig, EvalConfig, ModelConfig, load_config
from launcher.data import build_datasets
from launcher.data.store import HIT
from launcher.data.synthetic import write_token_file
from launcher.models import model_spec
from tests.helpers import TINY_LM, make_text, read_run, rel_l2, run_ok, run_split

pytestmark = pytest.mark.launch

MB = 10**6
SHORT = ("run.max_steps=3", "batch.global_batch_size=8", "batch.micro_batch_size=2", "eval.fraction=0")


def peak_rss(out) -> int:
    return max(read_run(out).summary.peak_mem_bytes_per_rank)


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """The same 3-step run on 1e6 and on 1e9 tokens (2 GB, larger than the page cache a test should assume)."""
    tmp = tmp_path_factory.mktemp("tokens")
    runs = {}
    for name, tokens in (("small", 10**6), ("large", 10**9)):
        path = write_token_file(tmp / f"{name}.bin", tokens)
        runs[name] = read_run(run_ok(tmp, 1, name, f"data.name={path}", f"data.cache_dir={tmp / 'cache'}", *SHORT))
        path.unlink()  # 2 GB of disk back before the next test
    return runs


def test_a_billion_tokens_train_in_the_memory_of_a_million(token_files):
    small, large = token_files["small"].summary, token_files["large"].summary
    assert (large.data.tokens, large.data.layout, large.steps) == (10**9, "blocks", 3)
    seq_len = load_config(TINY_LM).data.seq_len
    assert large.data.train_samples == (10**9 - 1) // seq_len  # every block of the file, none in memory
    grew = max(large.peak_mem_bytes_per_rank) - max(small.peak_mem_bytes_per_rank)
    assert grew < 100 * MB, f"peak RSS per rank grew by {grew / MB:.0f} MB from 1e6 to 1e9 tokens"


def test_a_cached_300k_row_csv_trains_in_the_memory_of_1k_rows(tmp_path):
    rows = {"small": 1_000, "large": 300_000}
    cache, model = tmp_path / "cache", ModelConfig(name="tiny-bert", task="cls")
    outs = {}
    for name, count in rows.items():
        path = tmp_path / f"{name}.csv"
        path.write_text("text,label\n" + "".join(f"{make_text(i, 3 + i % 17)},{i % 2}\n" for i in range(count)))
        data = DataConfig(name=str(path), cache_dir=str(cache), seq_len=64)
        if name == "large":  # a run before this one tokenized it: the store is what the launch maps
            build_datasets(data, EvalConfig(fraction=0), model, model_spec(model), 0)
        overrides = (f"data.name={path}", f"data.cache_dir={cache}", "data.seq_len=64", *SHORT)
        outs[name] = run_ok(tmp_path, 1, name, *overrides, config="configs/runs/tiny_cls.yaml")
    large = read_run(outs["large"]).summary
    assert (large.data.tokenized_cache, large.data.train_samples) == (HIT, 300_000)
    grew = peak_rss(outs["large"]) - peak_rss(outs["small"])
    assert grew < 50 * MB, f"peak RSS per rank grew by {grew / MB:.0f} MB from 1k to 300k cached rows"


def test_packed_blocks_give_the_same_model_under_every_split(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"{make_text(i, 2 + i % 9)}\n" for i in range(120)))
    common = (
        f"data.name={docs}",
        "data.packing=true",
        "data.seq_len=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.dtype=float64",
        "model.dropout=0",
        "run.max_steps=4",
        "batch.global_batch_size=8",
        "batch.accum_steps=null",
    )
    splits = {"accum_1x4": (1, 2), "ddp_accum_2x2": (2, 2), "ddp_2x1": (2, 4)}  # processes, micro batch
    runs = {  # the 1-process reference trains in this process
        name: read_run(run_split(tmp_path, procs, name, *common, f"batch.micro_batch_size={micro}"))
        for name, (procs, micro) in splits.items()
    }
    reference = runs.pop("accum_1x4")
    assert reference.summary.data.layout == "blocks" and reference.summary.accum_steps == 4
    for name, run in runs.items():
        assert rel_l2(run.weights, reference.weights) <= 1e-10, name
        assert run.losses == pytest.approx(reference.losses, rel=1e-10), name
