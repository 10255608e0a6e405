"""Two hosts on one machine: network namespaces joined by a veth pair, for the tests of what crosses a network.

Machine 0 is 10.77.0.1 and machine 1 is 10.77.0.2, addresses that exist only inside the test's own namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ADDRS = ("10.77.0.1", "10.77.0.2")
_PAIRS = itertools.count()


@dataclass
class Host:
    netns: str
    dev: str
    addr: str
    hostname: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[list[Host]]:
    """Two namespaces joined by a veth pair; always removed, even when the test fails."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("network namespaces need root, iproute2's `ip` and util-linux's `unshare`")
    # Unique per test process (other sessions may run the same tests) and per pair within it.
    tag = f"mn{os.getpid() % 100000}{next(_PAIRS)}"
    pair = [Host(f"{tag}h{i}", f"{tag}v{i}", addr, f"node{i}") for i, addr in enumerate(ADDRS)]
    created: list[str] = []
    try:
        for host in pair:
            try:
                ip("netns", "add", host.netns)
            except subprocess.CalledProcessError as err:
                pytest.skip(f"cannot create a network namespace: {err.stderr.strip()}")
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
