"""A real Ray head on loopback for job tests: `ray start --head` in its own temp dir, ended by PID.

    with RayHead.start(num_cpus=2) as head:          # skips the test when no head comes up in 60 s
        head.submit([sys.executable, "-m", "pipelines.batch_sample", ...])   # `ray job submit`

or the ``ray_head`` fixture (module scope). Every port is explicit and chosen free on 127.0.0.1, the
temp dir is a short folder under /tmp (Ray's unix socket paths must stay under ~107 bytes), the dashboard
is on (job submission goes through it) and token authentication is off (RAY_AUTH_MODE=disabled) for
both `ray start` and `ray job submit`.

Stopping never uses `ray stop` (which would end every Ray instance of the machine): the head's daemons
are found by their command lines, which name this head's unique temp dir, together with their child
processes (workers, job drivers), and each is ended by PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY_BIN = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_free_ports(count: int, exclude: range = range(0)) -> list[int]:
    """``count`` different free ports outside ``exclude`` (the OS may hand out a closed port again)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port not in exclude:
            ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(count: int, low: int = 20000, high: int = 40000, tries: int = 50) -> tuple[int, int]:
    """``count`` consecutive free ports (first, last), for Ray's worker port range."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(low, high - count)
        if all(_port_free(p) for p in range(base, base + count)):
            return base, base + count - 1
    raise RuntimeError(f"no {count} consecutive free ports in [{low}, {high})")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended already
    except (OSError, IndexError):
        return False


def processes_of(marker: str) -> list[int]:
    """PIDs of processes whose command line names ``marker`` (a head's temp dir) and of their descendants.

    Reads /proc (Linux): Ray's workers retitle themselves ("ray::IDLE"), so they are found as children
    of the daemons, not by their command lines.
    """
    pattern = re.compile(re.escape(marker.rstrip("/")) + r"(/|\s|$)")
    me = os.getpid()
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    parents = {pid: _parent(pid) for pid in pids}
    found = {pid for pid in pids if pid != me and pattern.search(_cmdline(pid))}
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found and pid != me}
        grew = not children <= found
        found |= children
    return sorted(pid for pid in found if _alive(pid))


def end_processes(pids: Sequence[int], grace_s: float = 3.0) -> None:
    """SIGTERM each PID, wait up to ``grace_s`` for them to end, then SIGKILL the ones still alive.

    The grace is short: Ray's GCS, raylet and agents can sit on SIGTERM while their peers go down.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class RayHead:
    """A running head: ``gcs_address`` (host:port given to `ray start`), ``dashboard_url`` (the job API),
    ``temp_dir`` (its sessions and sockets), ``env`` (for `ray` commands against it)."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls, num_cpus: int = 2, object_store_memory: int = 100_000_000, timeout_s: float = START_TIMEOUT_S
    ) -> RayHead:
        """Start a head, wait until its job API answers; ``pytest.skip`` when that fails in time."""
        temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: socket paths live under it
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        low, high = free_port_range(100)
        names = (
            "port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
        ports = dict(zip(names, distinct_free_ports(len(names), exclude=range(low, high + 1))))
        cmd = [
            str(RAY_BIN),
            "start",
            "--head",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_memory}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        head = cls(
            temp_dir=temp_dir,
            gcs_address=f"127.0.0.1:{ports['port']}",
            dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
            env=env,
        )
        try:
            deadline = time.monotonic() + timeout_s
            started = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
            )
            head.log.append(started.stdout + started.stderr)
            if started.returncode != 0:
                raise RuntimeError(f"`ray start --head` exited with {started.returncode}")
            while not head._jobs_api_ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the dashboard's job API did not answer within {timeout_s:.0f} s")
                time.sleep(0.5)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as e:
            tail = "\n".join(head.log)[-2000:]
            head.stop()
            pytest.skip(f"a local Ray head could not start: {e}\n{tail}")
        return head

    def _jobs_api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def submit(self, entrypoint: Sequence[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the job, streams its log); no runtime_env upload."""
        cmd = [str(RAY_BIN), "job", "submit", "--address", self.dashboard_url, "--", *entrypoint]
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )

    def processes(self) -> list[int]:
        return processes_of(self.temp_dir)

    def stop(self) -> None:
        """End this head's processes by PID (never `ray stop`) and remove its temp dir."""
        for _ in range(3):  # a worker may fork while we end its parent: look again
            procs = self.processes()
            if not procs:
                break
            end_processes(procs)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray head with 2 CPUs on loopback for the module's tests; stopped (by PID) afterwards."""
    head = RayHead.start()
    try:
        yield head
    finally:
        head.stop()
