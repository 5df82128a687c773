"""A real two-node Ray cluster on this machine, started with `ray start` as a user would, for tests.

Every node is a `ray start --block` in its own session (so stopping or killing a node touches
no other Ray on the machine; its task workers take process groups of their own inside that
session, so a lost node is every process of the session killed), on loopback addresses only:
Ray turns 127.0.0.1 into the machine's network address, so the nodes take 127.0.0.2 (head) and
127.0.0.3 (worker), which are loopback too. Ports are picked free, the temp dir is private,
token authentication is on with a token file of this cluster's own (RAY_AUTH_TOKEN_PATH), and
health checks are fast so a killed node is declared dead within seconds.

The worker node can be started in its own mount namespace with an empty tmpfs over one
directory (`hidden`), which makes that directory "local disk of the driver" as far as the
worker is concerned: the shared-storage check must refuse it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 90
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                 "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}


class ClusterUnavailable(RuntimeError):
    """The cluster could not be started here (the test skips with this reason)."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (outside Ray's default worker port range, which starts at 10002)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if not 10002 <= port <= 19999 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """Every live process in session `sid` (a node started with start_new_session=True and all it spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
    return pids


def kill_session(sid: int, rounds: int = 20) -> None:
    """SIGKILL session `sid` until none of it is left alive (a process forked during a scan is caught
    by the next one). Zombies, which no signal removes, count as gone."""
    for _ in range(rounds):
        alive = [pid for pid in session_pids(sid) if not _is_zombie(pid)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def can_hide_directories() -> bool:
    """Whether this process may make a private mount namespace (root, unshare available)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


class LocalCluster:
    """Head + worker node via `ray start`; `submit` runs `ray job submit` against the dashboard.

    Everything lives in a short directory under /tmp (removed by `stop`): Ray's Unix sockets go
    under its temp dir and may not exceed 107 bytes, which pytest's deep tmp paths can.
    """

    def __init__(self, hide: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pnirc-", dir="/tmp"))
        self.hidden = self.root / "hidden" if hide else None
        self.bin = Path(sys.executable).parent
        self.ray = str(self.bin / "ray")
        self.temp_dir = self.root / "ray"
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.gcs_port, self.dashboard_port, self.client_port, *self.agent_ports = free_ports(3 + 8)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(key, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _agent_args(self, ports: list[int]) -> list[str]:
        return ["--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
                "--runtime-env-agent-port", str(ports[2]), "--metrics-export-port", str(ports[3])]

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self) -> None:
        self._spawn("head", [
            self.ray, "start", "--head", "--block", "--node-ip-address", HEAD_IP, "--port", str(self.gcs_port),
            "--num-cpus", "1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(self.client_port), "--temp-dir", str(self.temp_dir),
            "--system-config", json.dumps(SYSTEM_CONFIG), "--disable-usage-stats", *self._agent_args(self.agent_ports[:4]),
        ])
        self.wait_nodes(1)
        self.start_worker()

    def start_worker(self) -> None:
        """(Re)start the worker node; with `hidden`, inside a mount namespace that masks that directory."""
        argv = [self.ray, "start", "--block", "--address", self.gcs_address, "--node-ip-address", WORKER_IP,
                "--num-cpus", "1", "--disable-usage-stats", *self._agent_args(self.agent_ports[4:])]
        if self.hidden is not None:
            self.hidden.mkdir(parents=True, exist_ok=True)
            script = 'mount -t tmpfs pni-ray-test "$0" && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.hidden), *argv]
        self._spawn("worker", argv)
        self.wait_nodes(2)

    def alive_nodes(self) -> list[dict]:
        """`ray list nodes` of the alive nodes (through the dashboard, as a user would)."""
        out = subprocess.run([self.ray, "list", "nodes", "--address", self.dashboard, "--format", "json",
                              "--filter", "state=ALIVE"], capture_output=True, text=True, env=self.env, timeout=60)
        if out.returncode != 0:
            return []
        try:
            return json.loads(out.stdout)
        except ValueError:
            return []

    def wait_nodes(self, n: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                log = (self.root / f"{name}.log").read_text(errors="replace")
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"`ray start` ({name}) exited with {proc.returncode}: {log[-1500:]}")
                if "Failed to start the dashboard" in log:  # `ray start --block` keeps running without it
                    raise ClusterUnavailable(f"the dashboard (needed by `ray job submit`) failed: {log[-1500:]}")
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                for node in nodes:
                    self.node_ids["head" if node.get("is_head_node") else "worker"] = node["node_id"]
                return
            time.sleep(1.0)
        raise ClusterUnavailable(f"the cluster did not reach {n} alive node(s) within {timeout_s:.0f} s")

    def kill_worker(self) -> None:
        """SIGKILL the whole worker node (its raylet, agents and task workers): a lost machine.

        Task workers run in process groups of their own inside the node's session, so a signal to
        the node's group alone leaves a running task alive long enough to finish and report.
        """
        proc = self.procs.pop("worker")
        kill_session(proc.pid)
        proc.wait(timeout=30)

    def submit(self, entrypoint: list[str], submission_id: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`ray job submit --address DASHBOARD --submission-id ID -- ENTRYPOINT` (waits for the job)."""
        argv = [self.ray, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                "--", *entrypoint]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout_s)

    def submit_async(self, entrypoint: list[str], submission_id: str) -> subprocess.Popen:
        argv = [self.ray, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                "--", *entrypoint]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)

    def stop(self) -> None:
        """TERM each node's process group, then KILL its whole session; nothing outside this cluster is touched."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            kill_session(proc.pid)  # the group and any task worker left in its own group
            proc.wait(timeout=30)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
