"""Session fixtures. Tests that launch processes carry the ``launch`` marker: ``pytest -m "not launch"`` is
the fast tier."""

from __future__ import annotations

import os

import pytest

from tests.helpers import hosts_or_skip


@pytest.fixture(autouse=True, scope="session")
def isolated_environment(tmp_path_factory):
    """Runs started by the tests (data.cache_dir=auto) cache tokenized data in the session's temp folder: never
    in the home folder, and never a hit left over from an earlier session. Nothing reaches the hub."""
    os.environ["ACCUM_CACHE"] = str(tmp_path_factory.mktemp("accum-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture
def hosts():
    """Two hosts on this machine: network namespaces joined by a veth pair (launcher.netns)."""
    with hosts_or_skip() as pair:
        yield pair
