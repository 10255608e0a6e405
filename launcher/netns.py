"""Two hosts on one machine: network namespaces joined by a veth pair, optionally shaped to a link rate.

Machine 0 is 10.77.0.1 and machine 1 is 10.77.0.2, addresses that exist only inside the pair's own namespaces.
compare's ``link`` modes and the multi-node tests run their machines here. The namespaces are always removed;
where they cannot be made (not root, no iproute2), ``two_hosts`` raises ``NamespacesUnavailable`` with the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.config import UserError

ADDRS = ("10.77.0.1", "10.77.0.2")
_PAIRS = itertools.count()
RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)bit$")
RATE_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9}


class NamespacesUnavailable(UserError):
    """Network namespaces cannot be made here: the reason, for a skip."""


@dataclass
class Host:
    netns: str
    dev: str
    addr: str
    hostname: str


def rate_bits_per_s(rate: str) -> float:
    """``100mbit`` -> 1e8, tc's spelling of a rate; ValueError for anything else."""
    match = RATE.match(rate.strip().lower())
    if not match:
        raise ValueError(f"{rate!r} is not a rate like 100mbit or 1gbit")
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def missing_tools(rate: str | None = None) -> str:
    """Why namespaces cannot be made here ('' when they can, as far as can be told without trying)."""
    tools = ["ip", "unshare"] + (["tc"] if rate else [])
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        return "network namespaces need root"
    if absent:
        return f"network namespaces need iproute2's ip, tc and util-linux's unshare; missing: {', '.join(absent)}"
    return ""


def shape(host: Host, rate: str) -> None:
    """Limit ``host``'s egress on the veth to ``rate`` with a token bucket (tbf; netem is not in every kernel).
    The bucket holds 1 ms of the rate (at least 16 KiB): a fuller bucket, refilled while the ranks compute,
    would send the next message's first part at the veth's own speed, faster than a real link of that rate."""
    burst_bytes = max(16 * 1024, int(rate_bits_per_s(rate) / 8 / 1000))
    subprocess.run(
        ["tc", "-n", host.netns, "qdisc", "add", "dev", host.dev, "root", "tbf", "rate", rate]
        + ["burst", str(burst_bytes), "latency", "100ms"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextlib.contextmanager
def two_hosts(rate: str | None = None) -> Iterator[list[Host]]:
    """Two namespaces joined by a veth pair, each end's egress shaped to ``rate`` when given; always removed,
    even when what runs inside fails."""
    reason = missing_tools(rate)
    if reason:
        raise NamespacesUnavailable(reason)
    # Unique per process (other sessions may run the same tests) and per pair within it.
    tag = f"mn{os.getpid() % 100000}{next(_PAIRS)}"
    pair = [Host(f"{tag}h{i}", f"{tag}v{i}", addr, f"node{i}") for i, addr in enumerate(ADDRS)]
    created: list[str] = []
    try:
        for host in pair:
            try:
                ip("netns", "add", host.netns)
            except subprocess.CalledProcessError as err:
                raise NamespacesUnavailable(f"cannot create a network namespace: {err.stderr.strip()}") from None
            created.append(host.netns)
            # `ip netns exec` mounts these over /etc. Each machine's hostname resolves to its own
            # address (c10d rendezvous hands it to the other machines), and no DNS server is asked:
            # none is reachable from inside, and waiting for one costs seconds per connection.
            etc = Path("/etc/netns") / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.hostname}\n" for h in pair))
        ip("link", "add", pair[0].dev, "type", "veth", "peer", "name", pair[1].dev)
        for host in pair:
            ip("link", "set", host.dev, "netns", host.netns)
            ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.dev)
            ip("-n", host.netns, "link", "set", host.dev, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            if rate:
                shape(host, rate)  # both ends: a collective's traffic flows both ways
        yield pair
    finally:
        for netns in created:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def on_host(host: Host, cmd: list[str]) -> list[str]:
    """``cmd`` inside ``host``'s network namespace, under its own hostname (a UTS namespace)."""
    return [
        "ip",
        "netns",
        "exec",
        host.netns,
        "unshare",
        "--uts",
        "sh",
        "-c",
        f'hostname {host.hostname} && exec "$@"',
        "sh",
        *cmd,
    ]


def on_hosts(hosts: list[Host], commands: list[list[str]]) -> list[list[str]]:
    """Machine i's command on host i, gloo pinned to that host's end of the veth (gloo otherwise takes the
    hostname's address, which need not be on the link: trap 9)."""
    pairs = zip(hosts, commands, strict=True)
    return [on_host(host, ["env", f"GLOO_SOCKET_IFNAME={host.dev}", *command]) for host, command in pairs]
