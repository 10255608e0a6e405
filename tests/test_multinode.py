"""Two machines on one host: network namespaces joined by a veth pair, one `accelerate launch` each.

Machine 0 is 10.77.0.1 and machine 1 is 10.77.0.2, addresses that exist only inside the test's own
namespaces; gloo is pinned to the veth by GLOO_SOCKET_IFNAME (gloo otherwise takes the address of the
hostname, which need not be on the link). Each machine runs one process; the reference is the same global batch
on one process.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher.launch import REPO, launch_env
from launcher.netns import ADDRS, Host, ip, missing_tools, on_host
from tests.helpers import (
    TINY_LM,
    TRAIN,
    assert_one_error_line,
    compared,
    hosts_or_skip,
    read_run,
    rel_l2,
    run_here,
    train_in_process,
    write_compare_config,
)

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
PORT = 29555  # free by construction: the namespaces are new
EQUIVALENCE = (
    "run.dtype=float64",
    "model.dropout=0.0",
    "optim.name=sgd",
    "optim.lr=0.5",
    "optim.grad_clip=0",
    "data.num_samples=40",
    "run.max_steps=6",
    "batch.global_batch_size=16",
    "batch.micro_batch_size=4",
    "batch.accum_steps=null",
)


def accelerate_launch(rank: int, rdzv: str, max_restarts: int = 0) -> list[str]:
    """The documented multi-machine command: machine ``rank`` of 2, one process each (2 in all)."""
    restarts = ["--max_restarts", str(max_restarts)] if max_restarts else []
    return [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        ADDRS[0],
        "--main_process_port",
        str(PORT),
        "--rdzv_backend",
        rdzv,
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *restarts,
        TRAIN,
    ]


def start_machine(tmp_path: Path, host: Host, rank: int, cmd: list[str], **env: str) -> subprocess.Popen:
    """Start machine ``rank``'s launch; its output goes to tmp_path/machine<rank>.log."""
    full = {**launch_env(tmp_path / "tmp"), "GLOO_SOCKET_IFNAME": host.dev, **env}
    log = (tmp_path / f"machine{rank}.log").open("w")
    # Own session: the teardown can kill the whole tree if the test fails half-way.
    return subprocess.Popen(
        on_host(host, cmd), cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Return codes of all machines; kill every process group still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return codes


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (the run's unique output folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def train_args(out: Path, *overrides: str) -> list[str]:
    return ["--config", TINY_LM, f"run.output_dir={out}", *EQUIVALENCE, *overrides]


def logs_of(tmp_path: Path) -> str:
    return "\n".join((tmp_path / f"machine{r}.log").read_text()[-3000:] for r in range(2))


@pytest.fixture(scope="module")
def net():
    """Two hosts shared by the tests that leave the link up."""
    with hosts_or_skip() as pair:
        yield pair


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, net) -> dict[str, tuple[Path, float]]:
    """Two machines, one process each, under each rendezvous: the run folder and its wall time."""
    found = {}
    for rdzv in ("static", "c10d"):
        root = tmp_path_factory.mktemp(rdzv)
        started = time.monotonic()
        procs = [
            start_machine(root, host, rank, [*accelerate_launch(rank, rdzv), *train_args(root / "out")])
            for rank, host in enumerate(net)
        ]
        codes = finish(procs, timeout_s=240)
        assert codes == [0, 0], f"machines exited {codes}\n{logs_of(root)}"
        found[rdzv] = (root / "out", time.monotonic() - started)
    return found


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory) -> dict:
    """The reference: the same config on 1 machine, 1 process (K=4 instead of 2 x K=2), trained in this process."""
    root = tmp_path_factory.mktemp("one_machine")
    return read_run(run_here(root, "one_machine", *EQUIVALENCE))


@pytest.mark.launch
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_machines_match_one_machine(uninterrupted, one_machine, rdzv):
    out, elapsed = uninterrupted[rdzv]
    print(f"two-machine run ({rdzv}): {elapsed:.1f} s")
    two = read_run(out)
    assert two.summary.world_size == 2 and two.summary.backend == "gloo"
    distance = rel_l2(two.weights, one_machine.weights)
    assert distance <= 1e-10, f"relative L2 {distance:.3e} between 2 machines and 1 process"


def assert_healed(out: Path, reference: Path, restarts: list[tuple[int, int, int]]) -> None:
    healed, straight = read_run(out), read_run(reference)
    unequal = [k for k in straight.weights if not torch.equal(straight.weights[k], healed.weights[k])]
    assert not unequal, f"weights differ from the uninterrupted run: {unequal[:3]}"
    assert [m.step for m in healed.metrics] == list(range(1, 7))
    assert [(r.attempt, r.previous_reached_step, r.resumed_from_step) for r in healed.summary.restarts] == restarts


HEALING = ("run.checkpoint_every=2", "run.inject_kill=1@3/0")  # global rank 1 dies after step 3


@pytest.mark.launch
def test_a_killed_worker_restarts_both_machines(tmp_path, net, uninterrupted):
    out = tmp_path / "out"
    procs = [
        start_machine(tmp_path, host, rank, [*accelerate_launch(rank, "c10d", 2), *train_args(out, *HEALING)])
        for rank, host in enumerate(net)
    ]
    codes = finish(procs, timeout_s=240)
    assert codes == [0, 0], f"machines exited {codes}\n{logs_of(tmp_path)}"
    assert_healed(out, uninterrupted["c10d"][0], [(1, 3, 2)])


@pytest.mark.launch
def test_a_machine_launched_again_by_hand_rejoins(tmp_path, net, uninterrupted):
    # Static rendezvous: global rank 1 is machine 1. Its first launch has no restarts, so it ends when its
    # worker dies; machine 0's agent restarts its own worker, which waits for machine 1 to come back.
    out = tmp_path / "out"
    args = train_args(out, *HEALING)
    machine0 = start_machine(tmp_path, net[0], 0, [*accelerate_launch(0, "static", 2), *args])
    first = start_machine(tmp_path, net[1], 1, [*accelerate_launch(1, "static"), *args])
    assert finish([first], timeout_s=120) != [0], logs_of(tmp_path)
    again = start_machine(tmp_path, net[1], 1, [*accelerate_launch(1, "static", 2), *args])
    codes = finish([machine0, again], timeout_s=240)
    assert codes == [0, 0], f"machines exited {codes}\n{logs_of(tmp_path)}"
    assert_healed(out, uninterrupted["static"][0], [(1, 3, 2)])


@pytest.mark.launch
def test_cut_link_fails_within_the_collective_timeout(tmp_path, hosts):
    timeout_s = 8
    out = tmp_path / "cut"
    # Through the image's entrypoint: NNODES/NODE_RANK/MASTER_* from the environment, its preflight.
    # Static rendezvous: under c10d the workers fail as fast with the same line, but torchrun's agents
    # then wait on the lost rendezvous store (measured: still alive 80 s after the cut).
    train = ["--config", TINY_LM, f"run.output_dir={out}", "run.max_steps=100000", f"run.dist_timeout_s={timeout_s}"]
    node_env = {
        "NNODES": "2",
        "NPROC": "1",
        "MASTER_ADDR": ADDRS[0],
        "MASTER_PORT": str(PORT),
        "PATH": f"{Path(ACCELERATE).parent}:{os.environ['PATH']}",
    }
    procs = [
        start_machine(tmp_path, host, rank, [str(ENTRYPOINT), *train], NODE_RANK=str(rank), **node_env)
        for rank, host in enumerate(hosts)
    ]
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert all(p.poll() is None for p in procs), "a machine exited before the link was cut"
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    ip("-n", hosts[1].netns, "link", "delete", hosts[1].dev)  # the cable is pulled
    cut = time.monotonic()
    codes = finish(procs, timeout_s=timeout_s + 60)
    to_failure = time.monotonic() - cut
    print(f"link cut -> both machines exited in {to_failure:.1f} s")
    logs = [(tmp_path / f"machine{r}.log").read_text() for r in range(2)]
    assert all(c is not None and c > 0 for c in codes), f"exit codes {codes}\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    assert to_failure <= timeout_s + 30, f"failed {to_failure:.1f} s after the cut"
    for log in logs:
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert errors and "run.dist_timeout_s" in errors[0], log[-3000:]
    assert processes_mentioning(str(out)) == []


# The preflight: each mistake is one line and a non-zero exit, before any process group forms.


def preflight(monkeypatch, **env: str) -> tuple[int, str]:
    """`python -m launcher.preflight`'s main() as a node script runs it, before `accelerate launch`."""
    from launcher import preflight as module

    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"PREFLIGHT_TIMEOUT_S": "1", **env}.items():
        monkeypatch.setenv(key, value)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = module.main()
    return code, stderr.getvalue()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GLOO_SOCKET_IFNAME": "nosuch0"}, ("GLOO_SOCKET_IFNAME=nosuch0", "no network interface", "lo")),
        ({"NCCL_SOCKET_IFNAME": "=nosuch0"}, ("NCCL_SOCKET_IFNAME==nosuch0", "no network interface")),
        ({"NNODES": "2", "NODE_RANK": "2"}, ("machine rank 2", "out of range", "0..1")),
        (
            {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "CLOSED"},
            ("127.0.0.1:CLOSED", "not reachable", "after 1 s"),
        ),
    ],
    ids=["gloo_ifname", "nccl_ifname", "machine_rank", "unreachable"],
)
def test_preflight_names_the_problem(monkeypatch, env, words):
    port = str(closed_port())
    code, stderr = preflight(monkeypatch, **{k: v.replace("CLOSED", port) for k, v in env.items()})
    assert code == 2
    assert_one_error_line(stderr, tuple(w.replace("CLOSED", port) for w in words))


def test_preflight_reports_a_taken_port_on_machine_0(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, stderr = preflight(monkeypatch, NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    assert code == 2
    assert_one_error_line(stderr, (f"MASTER_PORT={port} is taken",))


@pytest.mark.parametrize("use_libuv", [True, False], ids=["libuv_store", "classic_store"])
def test_preflight_passes_a_good_launch(monkeypatch, use_libuv):
    assert preflight(monkeypatch, NNODES="2", NODE_RANK="0", MASTER_PORT=str(closed_port()))[0] == 0
    # Machine 1, with a real rendezvous store at MASTER_ADDR:MASTER_PORT (what machine 0's agent hosts); the
    # probe speaks the store's protocol, which both of torch's servers answer.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=use_libuv)
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
    assert preflight(monkeypatch, **env) == (0, "")


def echo(listener: socket.socket) -> None:
    """Send back what the one client sends, until it closes."""
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(64):
            conn.sendall(data)


@pytest.mark.parametrize("answers", [False, True], ids=["silent", "echo"])
def test_preflight_tells_a_listener_from_a_rendezvous_store(monkeypatch, answers):
    """A port that accepts connections (a transparent proxy, another service) but is no store: one line, whether
    it says nothing or sends bytes back."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        if answers:
            threading.Thread(target=echo, args=(listener,), daemon=True).start()
        port = str(listener.getsockname()[1])
        code, stderr = preflight(monkeypatch, NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    assert code == 2
    assert_one_error_line(stderr, (f"127.0.0.1:{port}", "does not answer as a rendezvous store"))


@pytest.mark.parametrize(
    ("override", "env", "words"),
    [
        ("run.expected_world_size=2", {}, ("1 processes", "run.expected_world_size=2")),
        ("run.max_steps=1", {"GLOO_SOCKET_IFNAME": "nosuch0"}, ("GLOO_SOCKET_IFNAME=nosuch0",)),
    ],
    ids=["world_size", "ifname"],
)
def test_trainer_runs_the_preflight(tmp_path, monkeypatch, override, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", override)
    assert code == 2
    assert_one_error_line(stderr, words)


@pytest.mark.launch
def test_compare_runs_a_mode_over_a_shaped_link(tmp_path):
    """compare's ``link`` mode: two namespace hosts over a veth shaped to 100 Mbit/s, removed afterwards. The
    same split's every_step run sends 3x the bytes of no_sync (K = 3). What the rate costs in time is measured by
    the planner's validation (docs/planner.md), not asserted here."""
    if missing_tools("100mbit"):
        pytest.skip(missing_tools("100mbit"))
    modes = {  # no_sync is the reference: every_step must agree with it
        "no_sync": {
            "num_processes": 2,
            "num_machines": 2,
            "link": "100mbit",
            "overrides": {"batch.micro_batch_size": 2},
        },
        "every_step": {
            "num_processes": 2,
            "num_machines": 2,
            "link": "100mbit",
            "overrides": {"batch.micro_batch_size": 2, "batch.sync": "every_step"},
        },
    }
    common = {"run.dtype": "float64", "run.max_steps": 4, "data.num_samples": 48, "batch.global_batch_size": 12}
    config = write_compare_config(tmp_path, modes, common, floor={"control": False})
    before = set(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else set()
    result = compared(tmp_path, config)
    found = result["modes"]
    assert found["every_step"].verdict == "agrees", found
    no_sync, every = found["no_sync"].cost, found["every_step"].cost
    assert every.allreduce_bytes_per_step == pytest.approx(3 * no_sync.allreduce_bytes_per_step, rel=0.05)
    # Each machine keeps its log, and machine 0 alone writes: one line per step, one memory figure per process.
    run_dir = result["out"] / "modes" / "no_sync"
    assert found["no_sync"].num_machines == 2
    assert found["no_sync"].machine_logs == [str(run_dir / "train.log"), str(run_dir / "train.machine1.log")]
    assert all((run_dir / name).is_file() for name in ("train.log", "train.machine1.log"))
    run = read_run(run_dir)
    assert [m.step for m in run.metrics] == [1, 2, 3, 4]
    assert len(run.summary.peak_mem_bytes_per_rank) == 2
    after = set(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else set()
    assert after <= before  # the namespaces are gone
