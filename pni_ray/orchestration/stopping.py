"""How a batch run (`score`, `train-all`, the nightly job) is stopped: Ctrl-C and SIGTERM alike.

A scheduler stops a job with SIGTERM (Kubernetes at a deadline, `kill`, systemd); by default that
kills the process mid-line, and under Ray (whose ray.init installs its own handler) it ends in an
abort with a C++ stack dump. Within `terminate_as_interrupt` it raises KeyboardInterrupt as Ctrl-C
does, so each command stops through its own handling: committed work kept, one message saying what
stopped it and that a rerun resumes, exit status 3. `ray_session.join_ray` puts this handler back
after ray.init replaces it (it carries the `_pni_ray` mark for that).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's stop, `kill`, Kubernetes' deadline) raises
    KeyboardInterrupt as Ctrl-C does, so a batch run stops through its own handling (committed parts
    kept, a message, exit status 3) instead of dying mid-line. Main thread only; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        _received[0] = signal.Signals(signum).name
        raise KeyboardInterrupt(_received[0])

    _raise._pni_ray = True  # type: ignore[attr-defined]  # join_ray puts this handler back after ray.init
    _received[0] = None
    before = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


# the signal terminate_as_interrupt last turned into KeyboardInterrupt: Ray's blocking calls (ray.wait) run
# the handler inside their own signal check and raise a bare KeyboardInterrupt of their own in its place
_received: list[str | None] = [None]


def stop_signal_name(exc: KeyboardInterrupt) -> str:
    """Which signal stopped a run: terminate_as_interrupt's name (on the exception, or recorded where
    Ray raised its own in its place), else Ctrl-C's."""
    return str(exc.args[0]) if exc.args else (_received[0] or "SIGINT")


def interrupted_message(exc: KeyboardInterrupt, kept: str, rerun_does: str = "resume") -> str:
    """What a stopped run tells its user, in every command alike: what stopped it, what is kept, what to do."""
    return f"interrupted ({stop_signal_name(exc)}): {kept}; rerun the same command to {rerun_does}"
