"""What the tests share: launching the real thing (`accelerate launch` over gloo on CPU), running the trainer
and compare in this process for their error paths, reading runs back, and the local "pretrained" models and
text files that stand in for a hub download."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher.compare.judge import rel_l2  # noqa: F401 - shared with the test modules
from launcher.compare.results import read_comparison
from launcher.launch import REPO, Job, LaunchOutcome, job_commands, launch_env
from launcher.netns import Host, NamespacesUnavailable, two_hosts
from launcher.rundir import read_run  # noqa: F401 - shared with the test modules

TRAIN = "launcher/train.py"
TINY_LM = "configs/runs/tiny_lm.yaml"


# ----------------------------------------------------------------------------------------------- launching


def launch(tmp_path: Path, nproc: int, *args: str, timeout: float = 300, **kwargs) -> LaunchOutcome:
    """Run the trainer to its end and return the outcome; its output is in the outcome's log. One process runs
    train.py directly (no launcher: about 1.5 s less), more go through `accelerate launch`."""
    job = start(tmp_path, nproc, *args, **kwargs)
    return job.wait(timeout)


def start(
    tmp_path: Path,
    nproc: int,
    *args: str,
    config: str = TINY_LM,
    env: dict | None = None,
    max_restarts: int = 0,
    log: str = "launch.log",
) -> Job:
    """Start the trainer without waiting, in its own session so that a test can signal or kill the whole group;
    its output goes to tmp_path/``log``, readable while it runs. ``max_restarts``: under the elastic agent."""
    (base,) = job_commands(nproc, max_restarts=max_restarts)
    command = [*base, "--config", config, *args]
    return Job([command], [tmp_path / log], {**launch_env(tmp_path / "tmp"), **(env or {})}).start()


def run_ok(tmp_path: Path, nproc: int, name: str, *overrides: str, **kwargs) -> Path:
    """Launch a run into tmp_path/name and fail the test with its log unless it exits 0 (a negative code is a
    kill, not a pass)."""
    out = tmp_path / name
    outcome = launch(tmp_path, nproc, f"run.output_dir={out}", *overrides, **kwargs)
    assert outcome.ok, f"{name} exited {outcome.returncode}\n{outcome.log_text()[-6000:]}"
    return out


def run_here(tmp_path: Path, name: str, *overrides: str, config: str | Path = TINY_LM) -> Path:
    """A 1-process run into tmp_path/name, trained in this process (the launch of one process is nothing but its
    imports, about 2 s of CPU); fails the test with its stderr unless it exits 0."""
    out = tmp_path / name
    code, stderr = train_in_process(f"run.output_dir={out}", *overrides, config=config)
    assert code == 0, f"{name} exited {code}\n{stderr[-6000:]}"
    return out


def run_split(tmp_path: Path, nproc: int, name: str, *overrides: str, config: str | Path = TINY_LM) -> Path:
    """``run_here`` for 1 process, ``run_ok`` (launched) for more: a run whose launch is not what is tested."""
    if nproc == 1:
        return run_here(tmp_path, name, *overrides, config=config)
    return run_ok(tmp_path, nproc, name, *overrides, config=config)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the ranks of an `accelerate launch` agent), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return sorted(found)


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = child_pids(todo.pop())
        found.update(children)
        todo += children
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ------------------------------------------------------------------------------------------- checkpoints

# float64 runs of 8 steps, AdamW (moments and step count in the optimizer state: a resume must restore them),
# cosine LR with warmup, 40 samples so the epoch has a short last window, a checkpoint every 2 steps.
CHECKPOINTED = (
    "run.dtype=float64",
    "model.dropout=0.0",
    "optim.name=adamw",  # moments and step count in the optimizer state: the resume must restore them
    "optim.lr=0.01",
    "optim.schedule=cosine",
    "optim.warmup_steps=2",
    "optim.grad_clip=0",
    "data.num_samples=40",
    "run.max_steps=8",
    "batch.global_batch_size=16",
    "batch.micro_batch_size=4",
    "batch.accum_steps=null",
    "run.checkpoint_every=2",
)
PAUSE_AT_4 = {"ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP": "4"}  # holds rank 0 in the save of step 4 until a signal


def paused_in_save(out: Path, step: int) -> Path:
    """Wait until rank 0 is held in the save of ``step`` (files written, not renamed); returns the temp folder."""
    partial = out / "checkpoints" / f".tmp-step-{step:08d}"
    wait_until(lambda: (partial / "rng.pt").exists(), 120, f"the held save of step {step}")
    time.sleep(0.5)  # from the last file to signal.pause() is microseconds; leave it a wide margin
    return partial


# ------------------------------------------------------------------------------------------- error lines


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_one_error_line(text: str, words: tuple[str, ...] | list[str]) -> str:
    """Exactly one ``error:`` line, no traceback, and every word in it; returns the line."""
    errors = error_lines(text)
    assert len(errors) == 1, text[-5000:]
    assert "Traceback" not in text, text[-5000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def reset_accelerate() -> None:
    """Accelerate's state is process-global: forget it, so the next in-process run forms its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_in_process(*args: str, config: str | Path | None = TINY_LM) -> tuple[int, str]:
    """The trainer's ``main()`` in this process, as one process without a launcher: (exit code, stderr).
    One thread, as a launched process has (OMP_NUM_THREADS=1): its float64 runs are bitwise a launched run's."""
    import torch

    from launcher.train import main

    torch.set_num_threads(1)
    stderr = io.StringIO()
    argv = [*(["--config", str(config)] if config else []), *args]
    environ = dict(os.environ)  # Accelerate sets RANK, MASTER_PORT... while it forms (or fails to form) a group
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        reset_accelerate()
        os.environ.clear()
        os.environ.update(environ)
    return code, stderr.getvalue()


def compare_in_process(*args: str) -> tuple[int, str]:
    """compare's ``main()`` in this process (config errors end before any launch): (exit code, stderr)."""
    from launcher.compare.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, stderr.getvalue()


# ------------------------------------------------------------------------------------------------- compare


def write_compare_config(folder: Path, modes: dict, overrides: dict, **extra) -> Path:
    path = folder / "compare.yaml"
    data = {"base": str(REPO / TINY_LM), "output_dir": str(folder / "out"), "overrides": overrides, "modes": modes}
    path.write_text(yaml.safe_dump({**data, **extra}, sort_keys=False))
    return path


def compare(folder: Path, config: Path | str, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The compare command as a user runs it, in its own process."""
    cmd = [sys.executable, "-m", "launcher.compare", "--config", str(config), *overrides]
    return subprocess.run(
        cmd, cwd=REPO, env=launch_env(folder / "tmp"), capture_output=True, text=True, timeout=timeout
    )


def compared(folder: Path, config: Path | str, *overrides: str, returncode: int = 0, out: Path | None = None) -> dict:
    """Run a comparison and read its compare.json back, failing the test unless it exits ``returncode``."""
    proc = compare(folder, config, *overrides)
    assert proc.returncode == returncode, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = out or folder / "out"
    result = read_comparison(out / "compare.json")
    return {"out": out, "result": result, "modes": {m.name: m for m in result.modes}, "proc": proc}


# --------------------------------------------------------------------------- local models and data files

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing loud songs".split()
TOPICS = ["apple", "river", "guitar"]
FILLER = ["the", "a", "big", "small", "old", "new", "red", "blue", "near", "over", "under", "with"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair_rows(n: int, seed: int) -> list[str]:
    """CSV lines: label "yes" when both sentences name the same topic word, else "no" (a learnable pair task)."""
    rng = random.Random(seed)

    def sentence(topic: str) -> str:
        words = rng.sample(FILLER, rng.randint(2, 5))
        words.insert(rng.randrange(len(words) + 1), topic)
        return " ".join(words)

    rows = ["sentence1,sentence2,label"]
    for _ in range(n):
        first = rng.choice(TOPICS)
        same = rng.random() < 0.5
        second = first if same else rng.choice([t for t in TOPICS if t != first])
        rows.append(f"{sentence(first)},{sentence(second)},{'yes' if same else 'no'}")
    return rows


def save_tiny_pretrained_lm(folder: Path) -> None:
    """A GPT-2 and a word-level tokenizer built here and saved like a hub checkpoint (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2, pad_token_id=0, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_pretrained_bert(folder: Path, head: bool = True) -> None:
    """A 2-layer BERT classifier (or, without ``head``, a base ``BertModel``) and a word-piece tokenizer over the
    pair task's words, saved like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    torch.manual_seed(0)  # the same "pretrained" weights in every session
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + TOPICS + FILLER) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(TOPICS) + len(FILLER),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
        architectures=["BertForSequenceClassification" if head else "BertModel"],
    )
    config._attn_implementation = "eager"
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def hosts_or_skip(rate: str | None = None) -> Iterator[list[Host]]:
    """``launcher.netns.two_hosts``, a skip where namespaces cannot be made here (not root, no iproute2)."""
    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(two_hosts(rate))
        except NamespacesUnavailable as err:
            pytest.skip(str(err))
        yield hosts
