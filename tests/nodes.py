"""DICOM nodes in child processes, for the tests: our daemon and DCMTK's tools.

``AgentLauncher`` starts ``python -m dicomagent serve`` on a free port of
127.0.0.1 and stops it with SIGTERM; ``RunningNode`` says where a node listens
and what it logged; ``run`` runs a command to completion. The fixtures in
``conftest.py`` wrap these. A missing DCMTK binary is a failure, never a skip:
interop is the proof (STYLE.md, "Tests").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
#: Agent.stop() lets associations finish for 30 s; allow a little more.
STOP_TIMEOUT = 40.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def require_binary(name: str) -> str:
    """The path of a DCMTK tool; fail (never skip) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: the interop tests need DCMTK "
                    f"(Debian package 'dcmtk'; scripts/test.sh installs it)", pytrace=False)
    return path


def run(cmd: list[str], timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, capturing stdout and stderr as text."""
    if cmd and os.sep not in cmd[0] and cmd[0] != sys.executable:
        cmd = [require_binary(cmd[0]), *cmd[1:]]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:g} s\n"
                    f"stdout: {error.stdout}\nstderr: {error.stderr}")


_uid_counter = iter(range(1, 1 << 30))


def new_uid() -> str:
    """A fresh UID (pydicom's root; a counter keeps UIDs of one run apart)."""
    import pydicom.uid
    return pydicom.uid.generate_uid(entropy_srcs=[str(os.getpid()), str(time.time_ns()),
                                                  str(next(_uid_counter))])


def dicomagent_cmd(*args: str) -> list[str]:
    """The ``dicomagent`` command, through the interpreter running the tests."""
    return [sys.executable, "-m", "dicomagent", *args]


class PortTaken(Exception):
    """The node could not listen: something else took the port after ``free_port``."""


def _owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (from /proc).

    A successful connect alone does not prove the node is up: another process may
    hold the port, or the connect may be a TCP self-connect to an ephemeral port.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") in inodes:
                return True
        except OSError:
            continue
    return False


def wait_for_port(port: int, process: subprocess.Popen, log, timeout: float) -> None:
    """Wait until ``process`` listens on ``port`` and the port accepts a TCP connection.

    Raises ``PortTaken`` when the process exited because the port was in use; fails
    the test on any other early exit, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = log()
            if "in use" in text.lower():
                raise PortTaken(f"{process.args}: port {port} in use; its log:\n{text}")
            pytest.fail(f"{process.args} exited with {process.returncode} before listening; "
                        f"its log:\n{text}")
        if _owns_listener(process.pid, port):
            try:
                with socket.create_connection((HOST, port), timeout=1.0):
                    return
            except OSError:
                pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{process.args} not listening on {HOST}:{port} after {timeout:g} s; "
                        f"its log:\n{log()}")
        time.sleep(0.05)


def start_listening(make_cmd, port: int | None, log_path: Path, cwd: Path,
                    env: dict | None = None) -> tuple[list[str], subprocess.Popen, int]:
    """Start ``make_cmd(port)`` and wait until it listens; returns (cmd, process, port).

    With ``port`` None a free port is chosen, and chosen again (twice at most) if
    another process takes it first.
    """
    attempts = 3 if port is None else 1
    for attempt in range(attempts):
        chosen = port or free_port()
        cmd = make_cmd(chosen)
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=cwd, env=env)
        try:
            wait_for_port(chosen, process, lambda: log_path.read_text(errors="replace"),
                          START_TIMEOUT)
            return cmd, process, chosen
        except PortTaken:
            if attempt == attempts - 1:
                pytest.fail(f"{cmd}: port {chosen} in use; its log:\n"
                            f"{log_path.read_text(errors='replace')}")
    raise AssertionError("unreachable")


def _proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@dataclass
class RunningNode:
    """A DICOM node in a child process: where it listens, and what it logged."""

    host: str
    port: int
    ae_title: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path | None = None
    config_path: Path | None = None
    cmd: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the node wrote to stderr (and stdout) so far."""
        return self.log_path.read_text(errors="replace")

    def log_mark(self) -> int:
        """A position in the log; ``log_since(mark)`` returns what came after it."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(mark)
            return handle.read().decode(errors="replace")

    def wait_for_log(self, text: str, mark: int = 0, timeout: float = 5.0) -> str:
        """Wait until ``text`` appears in the log after ``mark``; return the log since then."""
        deadline = time.monotonic() + timeout
        while True:
            since = self.log_since(mark)
            if text in since:
                return since
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout:g} s; log since "
                                     f"mark:\n{since}")
            time.sleep(0.05)

    def rss_kb(self) -> int:
        """Resident set size of the process, from /proc/PID/status (kB)."""
        return _proc_status(self.pid, "VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM; wait for the exit status (kill and fail after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.cmd} still running {timeout:g} s after SIGTERM; its log:\n"
                        f"{self.log()}")


class AgentLauncher:
    """Starts ``dicomagent serve`` processes and stops them all at the end of a scope."""

    def __init__(self, make_dir):
        self._make_dir = make_dir
        self.nodes: list[RunningNode] = []

    def __call__(self, config_toml_text: str | None = None, **cli) -> RunningNode:
        """Start a daemon; ``cli`` becomes ``--name value`` (``data_dir`` -> ``--data-dir``).

        ``host`` and ``port`` default to 127.0.0.1 and a free port; ``data_dir`` to a
        fresh temporary directory.
        """
        workdir = self._make_dir()
        port = int(cli.pop("port", 0)) or None
        host = cli.pop("host", HOST)
        data_dir = Path(cli.pop("data_dir", workdir / "data"))
        args = ["--data-dir", str(data_dir)]
        ae_title = "DICOMAGENT"
        config_path = None
        if config_toml_text is not None:
            config_path = workdir / "dicomagent.toml"
            config_path.write_text(config_toml_text)
            args += ["-c", str(config_path)]
            ae_title = tomllib.loads(config_toml_text).get("agent", {}).get("ae_title", ae_title)
        for name, value in cli.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        if cli.get("aet"):
            ae_title = cli["aet"]
        log_path = workdir / "dicomagent.log"
        cmd, process, port = start_listening(
            lambda p: dicomagent_cmd("serve", "--host", host, "--port", str(p), *args),
            port, log_path, workdir)
        node = RunningNode(host, port, ae_title, process, log_path, data_dir, config_path, cmd)
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        problems = []
        for node in self.nodes:
            found = []
            if node.process.returncode is None:
                status = node.terminate()
                if status != 0:
                    found.append(f"{node.cmd} exited {status} after SIGTERM")
            if "Traceback" in node.log():
                found.append(f"{node.cmd} logged a traceback")
            if found:
                problems += [*found, f"its log:\n{node.log()}"]
        self.nodes.clear()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


def wait_for_echo(node: "RunningNode") -> None:
    """Wait until ``node`` answers C-ECHO (a bare TCP probe, as ``wait_for_port`` makes,
    only gets a "DUL Finite State Machine Error" into dcmqrscp's log; dcmqrscp forks per
    association)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if node.process.poll() is not None:
            pytest.fail(f"{node.cmd} exited {node.process.returncode}:\n{node.log()}")
        result = run(["echoscu", "-to", "2", "-aec", node.ae_title, node.host, str(node.port)])
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{node.cmd} does not answer C-ECHO:\n{result.stderr}\n{node.log()}")
        time.sleep(0.1)
