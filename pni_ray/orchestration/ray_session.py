"""One way to join Ray, shared by `train-all`, `score` and the nightly job.

Where to run, in this order:

1. ``--address`` (the command's flag, or the nightly config's ``address``): join that cluster;
   ``--address local`` forces the embedded Ray even when ``RAY_ADDRESS`` is set;
2. ``$RAY_ADDRESS``: join that cluster (``ray job submit`` sets it for its entrypoint, so a
   submitted ``pni-ray train-all`` or ``pni-ray nightly`` runs on the cluster);
3. otherwise an embedded local Ray for this command alone.

Joining never passes local-only arguments (CPUs, GPUs, object store size, system config):
Ray refuses them for an existing cluster, whose nodes declared their own resources.

Token authentication (Ray 2.60 turns it on for ``ray start --head`` whenever a token exists,
and for every embedded ``ray.init()``): every process that talks to the cluster needs
``RAY_AUTH_MODE=token`` and the token, from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``. Ray never sends the token to an address it was given explicitly unless
``RAY_AUTH_MODE=token`` is set, so a refused join says so instead of Ray's bare
"Unauthorized". Jobs submitted with ``ray job submit`` inherit the head node's environment
and need nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterator

ADDRESS_ENV = "RAY_ADDRESS"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOCAL = "local"
EMBEDDED, FLAG, ENV, EXISTING = "embedded", "--address", ADDRESS_ENV, "existing"
# seconds a head's GCS port has to accept a connection before the join is refused: ray.init itself retried
# an address nothing listened on for over 10 minutes (Ray 2.60), so a cron job with a wrong address hung
PROBE_SECONDS = 10.0


class RayJoinError(ConnectionError):
    """The cluster named by --address or $RAY_ADDRESS could not be joined (says which and why)."""


@dataclass(frozen=True)
class RaySession:
    """Where this process runs Ray and whether it started it (then it must shut it down)."""

    address: str  # the cluster's address, or "local"
    source: str  # "--address", "RAY_ADDRESS", "embedded" or "existing" (ray.init called before)
    started: bool
    is_cluster: bool  # tasks may run on other machines, so their paths must be on shared storage


def resolve_address(address: str | None, named_by: str = FLAG) -> tuple[str | None, str]:
    """(address to join or None for embedded Ray, where it came from); `named_by` is what gave
    `address` (the flag, or the nightly config's key), for messages."""
    if address:
        return (None, EMBEDDED) if address == LOCAL else (address, named_by)
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if env and env != LOCAL:
        return env, ENV
    return None, EMBEDDED


def local_init_kwargs(num_cpus: int | None = None, object_store_bytes: int | None = None) -> dict[str, Any]:
    """ray.init arguments of the embedded Ray: this command's cores, no dashboard, no idle workers.

    ``address="local"``: a bare ray.init() would join whatever `ray start` left running on this
    machine (/tmp/ray/ray_current_cluster) and then refuse num_cpus. Ray starts workers at nice
    15; an embedded Ray runs the job itself, so its workers get the caller's priority (a busy
    machine otherwise starves them), and only the processes the job asks for are started.
    """
    kwargs: dict[str, Any] = {
        "address": LOCAL,
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "_system_config": {"worker_niceness": max(0, os.nice(0)), "enable_worker_prestart": False,
                           "prestart_worker_first_driver": False},
    }
    if object_store_bytes:
        kwargs["object_store_memory"] = int(object_store_bytes)
    return kwargs


def join_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_bytes: int | None = None,
    log_to_driver: bool = True,
    named_by: str = FLAG,
) -> RaySession:
    """Join --address, else $RAY_ADDRESS, else start an embedded Ray (num_cpus etc. apply to it only)."""
    import ray

    if ray.is_initialized():  # the caller's session (a test, a notebook, the demo): use it, leave it running
        alive = sum(bool(n.get("Alive")) for n in ray.nodes())
        return RaySession(ray.get_runtime_context().gcs_address, EXISTING, started=False, is_cluster=alive > 1)
    target, source = resolve_address(address, named_by)
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    with _keeping_sigterm_handler():
        if target is None:
            with _quiet(EMBEDDED_NOTICES):
                ray.init(**local_init_kwargs(num_cpus, object_store_bytes), **common)
            return RaySession(LOCAL, EMBEDDED, started=True, is_cluster=False)
        problem = unreachable(target)
        if problem:
            raise RayJoinError(f"cannot join the Ray cluster at {target} (from {source}): {problem}: check the "
                               "address, and that the head runs (`ray status` on it)")
        try:
            ray.init(address=target, **common)
        except Exception as exc:  # noqa: BLE001 - any failure to join is reported with where the address came from
            raise RayJoinError(join_error_message(target, source, exc)) from exc
    return RaySession(target, source, started=True, is_cluster=True)


# what Ray says when it starts a local cluster that concerns clusters others join, not one a command starts for
# itself: "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out", on every run
EMBEDDED_NOTICES = ("ray._private.authentication.authentication_token_setup",)


@contextlib.contextmanager
def _quiet(loggers: tuple[str, ...]) -> Iterator[None]:
    """These loggers at ERROR within the block, as they were after."""
    before = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init installs its own SIGTERM handler (sys.exit, and a C++ stack dump) first thing, then may
    take a minute to start or join; a handler the caller installed (`stopping.terminate_as_interrupt`)
    is put back afterwards, and a SIGTERM that Ray's handler turned into an exit meanwhile is raised
    as the caller's would have been, so the run ends as one stopped by Ctrl-C: with its message and
    exit status."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    ours = main and callable(before) and getattr(before, "_pni_ray", False)
    try:
        yield
    except SystemExit as exc:
        if ours and exc.code == signal.SIGTERM:
            raise KeyboardInterrupt(signal.SIGTERM.name) from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGTERM, before)


def unreachable(target: str) -> str | None:
    """Why nothing answers at a host:port address (refused, no such host, silent for PROBE_SECONDS), or None;
    None also for "auto" and ray:// addresses, which ray.init resolves or reaches itself."""
    host, sep, port = target.rpartition(":")
    if target == "auto" or "://" in target or not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            return None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        return f"nothing answers at {host}:{port} ({why}{f' within {PROBE_SECONDS:g} s' if isinstance(exc, TimeoutError) else ''})"


def join_error_message(address: str, source: str, exc: BaseException) -> str:
    """What failed, which address (and from where), and the token-auth hint when it may apply.

    A client without RAY_AUTH_MODE=token sends no token; the GCS answers "Unauthenticated" and
    ray.init gives up after its retries with a bare ConnectionError, so the hint goes with both.
    """
    text = f"cannot join the Ray cluster at {address} (from {source}): {type(exc).__name__}: {exc}"
    auth = type(exc).__name__ == "AuthenticationError" or "authentication" in str(exc).lower()
    found = "could not find any running ray instance" not in str(exc).lower()  # `auto` with no cluster: no token issue
    if (auth or (isinstance(exc, ConnectionError) and found)) and os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
        text += (f"\n{'the cluster uses' if auth else 'if the cluster uses'} token authentication (Ray turns it on for "
                 f"`ray start --head` whenever a token exists): set {AUTH_MODE_ENV}=token and provide the cluster's "
                 "token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; `ray get-auth-token` on the head "
                 "prints it)")
    return text


def live_node_resources() -> list[dict[str, float]]:
    """Each live node's total resources (the connected cluster's)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def unplaceable(what: str, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> str | None:
    """Why no node of `nodes` (each one's total resources) can hold one `what` of `cpus` CPUs and `gpus`
    GPUs, or None: Ray places a task or actor on one node, so the cluster's sum says nothing."""
    need = {"CPU": cpus, "GPU": gpus}
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in nodes):
        return None
    shown = ", ".join(f"{node.get('CPU', 0):g} CPU / {node.get('GPU', 0):g} GPU" for node in nodes[:4]) or "none"
    more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
    return f"no Ray node can hold one {what} of {cpus:g} CPU and {gpus:g} GPU (nodes: {shown}{more})"
