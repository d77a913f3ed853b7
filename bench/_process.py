"""What the benchmark scripts share: the server processes they start, watch and stop.

``associations.py``, ``query.py`` and ``store.py`` each start servers (dicomagent, DCMTK
``storescp``, Orthanc) on loopback ports of their own, wait until they listen, read their
CPU time from /proc and stop them; those steps are written once, here. (A helper, not a
benchmark: the name starts with "_".)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on: a server, a client or a result is not what it must be."""


def stop_on_sigterm() -> None:
    """Make SIGTERM take the way out Ctrl-C takes (``KeyboardInterrupt``), so that the
    servers a script started are stopped either way."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    """A TCP port on ``HOST`` that nothing listens on (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its live descendants, all their threads
    (proc(5): /proc/PID/stat fields 14, 15; /proc/PID/task/TID/children). dicomagent's
    indexer is a child process: its CPU time counts as the server's."""
    user = system = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
        user += int(fields[11]) / CLOCK_TICKS
        system += int(fields[12]) / CLOCK_TICKS
    return user, system


def storescp_version() -> str:
    """DCMTK's version line, as ``storescp --version`` prints it."""
    try:
        out = subprocess.run(["storescp", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("$dcmtk:"):
            return line.strip("$ ")
    return out.splitlines()[0] if out else "unknown"


class ServerProcess:
    """A server process on ``HOST``:``port``, its output in ``log_path``.

    ``cpus``: the CPUs it may run on, set before exec so that every thread it starts
    inherits them (None: any).
    """

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path,
                 env: dict[str, str], cpus: set[int] | None = None,
                 log_path: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path or workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)))

    def ready(self) -> bool:
        """Whether the server answers on its port (a connection, closed at once); a
        server that is ready later than it listens says so here."""
        with socket.create_connection((HOST, self.port), timeout=0.5):
            return True

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        """Wait until ``ready``; raise ``BenchError`` if the process ends first or the
        deadline passes."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} "
                                 f"before it was ready\n{self.log_tail()}")
            try:
                if self.ready():
                    return
            except OSError:                 # not listening yet
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready on port {self.port} within "
                                 f"{deadline_s} s\n{self.log_tail()}")
            time.sleep(0.05)

    def cpu_times(self) -> tuple[float, float]:
        return cpu_times(self.proc.pid)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its log, indented, for an error message."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("    " + line for line in text)
