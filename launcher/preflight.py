"""Checks of what usually goes wrong across machines, each failing with one line; no torch, so a node checks fast.

Two callers: ``launcher/train.py`` (through ``distributed.preflight``) in every launched process,
before the process group forms; and ``python -m launcher.preflight`` on each node before
``accelerate launch`` (docker/entrypoint.sh, slurm/train.sbatch). The second matters most: with an
unreachable rendezvous, torchrun's agent on a non-zero machine waits for its rendezvous timeout
(600 s by default for static) before any training process starts.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.config import UserError


class LaunchError(UserError):
    """The launch does not give what the run needs; the message is one line for the user."""


# The variables each communication backend reads to pick its network interface. gloo otherwise takes the
# address the hostname resolves to, often a loopback one, and wants a concrete name (`^lo` is not accepted).
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class Launch:
    """Where this node stands in a multi-machine launch."""

    machine_rank: int
    num_machines: int
    master_addr: str | None
    master_port: int
    world_size: int | None = None


def network_interfaces() -> set[str]:
    """Names of the network interfaces of this host (of this network namespace)."""
    return {name for _, name in socket.if_nameindex()}


def check_ifname(var: str, value: str, interfaces: set[str]) -> None:
    """Refuse an interface variable that names no interface here.

    gloo takes exact names (comma-separated) and fails late and vaguely on a wrong one. NCCL takes
    prefixes, ``=name`` for an exact name and ``^...`` to exclude; an exclusion is not checked.
    """
    if not value or value.startswith("^"):
        return
    for name in value.split(","):
        exact = var == "GLOO_SOCKET_IFNAME" or name.startswith("=")
        name = name.removeprefix("=")
        if not (name in interfaces if exact else any(i.startswith(name) for i in interfaces)):
            raise LaunchError(
                f"{var}={value} names no network interface on this host ({socket.gethostname()}); "
                f"interfaces here: {', '.join(sorted(interfaces))}"
            )


# The pinned torch's c10d store protocol (its libuv and its classic server alike): a client opens with VALIDATE
# and the magic number, and PING answers with the nonce it was sent, in native byte order as torch sends them.
STORE_VALIDATE, STORE_PING, STORE_MAGIC = 0, 13, 0x3C85F7CE


def store_answers(addr: str, port: int, timeout_s: float) -> bool:
    """Whether what listens at ``addr:port`` is a c10d rendezvous store: it answers a PING with our nonce. A bare
    TCP connect is not enough (a transparent proxy or a sandbox answers it). Spoken over a plain socket with a
    timeout, because torch's own client blocks past its timeout on a peer that is not a store, and a thread left
    behind on it logs when that peer closes."""
    nonce = (os.getpid() ^ time.monotonic_ns()) & 0xFFFFFFFF
    try:
        with socket.create_connection((addr, port), timeout=timeout_s) as conn:
            conn.sendall(struct.pack("=BI", STORE_VALIDATE, STORE_MAGIC) + struct.pack("=BI", STORE_PING, nonce))
            reply = b""
            while len(reply) < 4:
                chunk = conn.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
    except OSError:  # refused, reset or timed out: no store answered
        return False
    return struct.unpack("=I", reply)[0] == nonce


def check_reachable(addr: str, port: int, timeout_s: float, store_timeout_s: float = 5.0) -> None:
    """Reach the rendezvous until it answers or ``timeout_s`` passes (machine 0 may start later); then check that
    it is a rendezvous store."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(left, 5.0))):
                pass
            if not store_answers(addr, port, min(store_timeout_s, max(left, 1.0))):
                raise LaunchError(
                    f"rendezvous {addr}:{port} (MASTER_ADDR:MASTER_PORT) accepts connections but does not answer as "
                    "a rendezvous store (a proxy, or another service on that port?); check --main_process_ip/"
                    "--main_process_port and that machine rank 0's launch is the one listening there"
                )
            return
        except OSError as err:
            if time.monotonic() + 0.5 >= deadline:
                reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
                raise LaunchError(
                    f"rendezvous {addr}:{port} (MASTER_ADDR:MASTER_PORT) is not reachable from this machine: "
                    f"{reason} after {timeout_s:g} s; check --main_process_ip/--main_process_port, that machine "
                    "rank 0 is running, and the network between the machines"
                ) from None
            time.sleep(0.5)


def check_port_free(port: int) -> None:
    """Machine 0 hosts the rendezvous: a taken port otherwise surfaces as a traceback from the launcher."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError as err:
            raise LaunchError(
                f"MASTER_PORT={port} is taken on this machine (rank 0 hosts the rendezvous there): {err.strerror}; "
                "choose another --main_process_port / MASTER_PORT"
            ) from None


def check_launch(launch: Launch, expected_world_size: int, env: Mapping[str, str], connect_timeout_s: float) -> None:
    """All checks, cheapest first; raises LaunchError on the first failure."""
    interfaces = network_interfaces()
    for var in IFNAME_VARS:
        check_ifname(var, env.get(var, ""), interfaces)
    if not 0 <= launch.machine_rank < launch.num_machines:
        raise LaunchError(
            f"machine rank {launch.machine_rank} is out of range for {launch.num_machines} machine(s): "
            f"use 0..{launch.num_machines - 1}"
        )
    if expected_world_size and launch.world_size is not None and launch.world_size != expected_world_size:
        raise LaunchError(
            f"the launch has {launch.world_size} processes but run.expected_world_size={expected_world_size}; "
            "check --num_machines and --num_processes (accelerate counts processes over all machines)"
        )
    if launch.machine_rank > 0 and launch.master_addr:
        check_reachable(launch.master_addr, launch.master_port, connect_timeout_s)


def launch_from_torchrun_env(env: Mapping[str, str]) -> Launch:
    """This process's launch as torchrun describes it to its workers (GROUP_RANK = machine rank)."""
    world_size = int(env.get("WORLD_SIZE", "1"))
    per_machine = int(env.get("LOCAL_WORLD_SIZE", "0") or world_size)
    return Launch(
        machine_rank=int(env.get("GROUP_RANK", "0")),
        num_machines=max(1, world_size // max(per_machine, 1)),
        master_addr=env.get("MASTER_ADDR"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        world_size=world_size,
    )


def launch_from_node_env(env: Mapping[str, str]) -> Launch:
    """The launch a node script is about to make, from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT."""
    return Launch(
        machine_rank=int(env.get("NODE_RANK", "0")),
        num_machines=int(env.get("NNODES", "1")),
        master_addr=env.get("MASTER_ADDR"),
        master_port=int(env.get("MASTER_PORT", "29500")),
    )


def main() -> int:
    """``python -m launcher.preflight``: check this node before ``accelerate launch``; exit 2 on a problem."""
    timeout_s = float(os.environ.get("PREFLIGHT_TIMEOUT_S", "60"))
    launch = launch_from_node_env(os.environ)
    try:
        check_launch(launch, 0, os.environ, timeout_s)
        if launch.machine_rank == 0 and launch.num_machines > 1:
            check_port_free(launch.master_port)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
