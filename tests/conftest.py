"""Fixtures that run real DICOM nodes: our daemon, and DCMTK's storescp.

- ``agent_factory(config_toml_text=None, **cli)`` starts ``python -m dicomagent serve``
  on a free port of 127.0.0.1 with a temporary data directory, waits until the port
  accepts TCP connections, and at the end of the test stops it with SIGTERM, asserting
  exit status 0 and no traceback in its log. ``module_agent_factory`` is the same for
  a daemon shared by the tests of one module.
- ``storescp`` runs DCMTK ``storescp -aet STORESCP PORT`` (TCP_NODELAY=1).
- ``run`` is ``nodes.run(cmd, timeout)``: run a command, capture its output.

The helpers themselves live in ``nodes.py``; the tests import them from there.
"""

from __future__ import annotations

import os
import signal

import pytest

from nodes import HOST, AgentLauncher, RunningNode, require_binary, run, start_listening


@pytest.fixture
def agent_factory(tmp_path_factory):
    """``agent_factory(config_toml_text=None, **cli)`` -> a running daemon (this test)."""
    launcher = AgentLauncher(lambda: tmp_path_factory.mktemp("agent"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_agent_factory(tmp_path_factory):
    """Like ``agent_factory``, for a daemon shared by the tests of one module."""
    launcher = AgentLauncher(lambda: tmp_path_factory.mktemp("agent"))
    yield launcher
    launcher.stop_all()


@pytest.fixture
def storescp(tmp_path):
    """DCMTK ``storescp -aet STORESCP PORT`` on a free port, files written under tmp_path."""
    binary = require_binary("storescp")
    out_dir = tmp_path / "storescp"
    out_dir.mkdir()
    log_path = tmp_path / "storescp.log"
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd, process, port = start_listening(
        lambda p: [binary, "-aet", "STORESCP", "-od", str(out_dir), str(p)],
        None, log_path, tmp_path, env)
    node = RunningNode(HOST, port, "STORESCP", process, log_path, out_dir, None, cmd)
    try:
        yield node
    finally:
        status = node.terminate(10.0)
        # storescp installs no SIGTERM handler: the signal ends it.
        assert status in (0, -signal.SIGTERM), f"storescp exited {status}:\n{node.log()}"


@pytest.fixture(name="run")
def run_fixture():
    """The ``run(cmd, timeout)`` helper, as a fixture."""
    return run
