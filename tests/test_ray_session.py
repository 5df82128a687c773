"""The one way to join Ray (train-all, score, nightly): address precedence, no local-only arguments when joining."""

from __future__ import annotations

import pytest

from pni_ray.orchestration import ray_session
from pni_ray.orchestration.ray_session import RayJoinError, join_ray, resolve_address


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init recorded instead of run (no Ray process is started)."""
    ray = pytest.importorskip("ray")
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_session, "unreachable", lambda target: None)  # the addresses below answer nothing
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == (None, "embedded")
    assert resolve_address("10.0.0.5:6379") == ("10.0.0.5:6379", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6390")
    assert resolve_address(None) == ("127.0.0.2:6390", "RAY_ADDRESS")  # what `ray job submit` sets
    assert resolve_address("10.0.0.5:6379") == ("10.0.0.5:6379", "--address")  # the flag wins
    assert resolve_address("local") == (None, "embedded")  # forced embedded Ray despite RAY_ADDRESS


@pytest.mark.parametrize("via_env", [False, True])
def test_joining_passes_no_local_only_arguments(fake_ray, monkeypatch, via_env):
    if via_env:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6390")
    session = join_ray(None if via_env else "127.0.0.2:6390", num_cpus=4, object_store_bytes=2**28)
    (kwargs,) = fake_ray
    assert kwargs.pop("address") == "127.0.0.2:6390"
    assert set(kwargs) == {"logging_level", "log_to_driver"}  # Ray refuses num_cpus/num_gpus for a cluster
    assert session.started and session.is_cluster and session.source == ("RAY_ADDRESS" if via_env else "--address")


def test_embedded_ray_gets_the_local_settings(fake_ray):
    session = join_ray(num_cpus=3, object_store_bytes=2**28, log_to_driver=False)
    (kwargs,) = fake_ray
    assert kwargs["address"] == "local"  # never a cluster that `ray start` left running on this machine
    assert kwargs["num_cpus"] == 3 and kwargs["object_store_memory"] == 2**28
    assert kwargs["include_dashboard"] is False and kwargs["log_to_driver"] is False
    assert kwargs["_system_config"]["worker_niceness"] >= 0
    assert session == ray_session.RaySession("local", "embedded", started=True, is_cluster=False)


def test_score_and_train_all_share_the_join(fake_ray, monkeypatch):
    from pni_ray.orchestration.score import ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6390")
    assert ensure_ray(num_cpus=2) is True
    assert fake_ray[-1]["address"] == "127.0.0.2:6390" and "num_cpus" not in fake_ray[-1]


def _init_raises(monkeypatch, error: BaseException) -> None:
    """ray.init fails with `error`; no token mode in the environment."""
    ray = pytest.importorskip("ray")

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    monkeypatch.setattr(ray_session, "unreachable", lambda target: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)


def test_refused_join_names_the_address_and_the_token_setting(monkeypatch):
    from ray.exceptions import AuthenticationError

    _init_raises(monkeypatch, AuthenticationError("Unauthorized: Missing authentication token"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6390")
    with pytest.raises(RayJoinError) as info:
        join_ray()
    text = str(info.value)
    assert "127.0.0.2:6390 (from RAY_ADDRESS)" in text and "RAY_AUTH_MODE=token" in text
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # token mode on but the wrong token: no misleading hint
    with pytest.raises(RayJoinError) as info:
        join_ray()
    assert "RAY_AUTH_MODE=token" not in str(info.value)


def test_unreachable_cluster_without_token_mode_mentions_it(monkeypatch):
    """Without RAY_AUTH_MODE=token Ray sends no token and ends with a bare ConnectionError."""
    _init_raises(monkeypatch, ConnectionError("Failed to connect to Ray cluster at 127.0.0.2:6390"))
    with pytest.raises(RayJoinError, match="(?s)from --address.*if the cluster uses token authentication"):
        join_ray("127.0.0.2:6390")


def test_an_address_nothing_answers_at_is_refused_at_once_without_the_token_hint(monkeypatch):
    """ray.init retried 127.0.0.1:1 for over 10 minutes; `auto` with no cluster is no token problem either."""
    import socket
    import time

    ray = pytest.importorskip("ray")
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(RayJoinError, match=rf"cannot join the Ray cluster at 127.0.0.1:{port} \(from --address\): "
                                           rf"nothing answers at 127.0.0.1:{port} \(Connection refused\)"):
        join_ray(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5 and not calls
    assert ray_session.unreachable("auto") is None and ray_session.unreachable("ray://10.0.0.1:10001") is None
    text = ray_session.join_error_message("auto", "--address", ConnectionError(
        "Could not find any running Ray instance. Please specify the one to connect to"))
    assert "token" not in text


def test_an_embedded_ray_does_not_announce_token_authentication(fake_ray, monkeypatch, caplog):
    """A Ray a command starts for itself said "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out" on every score and train-all run: nothing the user can or should act on.
    Joining a cluster, Ray still says what it says (there the token matters: jobs/README.md)."""
    import logging

    import ray
    from ray._private.authentication import authentication_token_setup as token_setup

    assert token_setup.logger.name in ray_session.EMBEDDED_NOTICES  # Ray's logger still has the name quieted
    monkeypatch.setattr(ray, "init", lambda **kwargs: token_setup._warn_token_auth_enabled())
    with caplog.at_level(logging.WARNING):
        join_ray()
        assert "Token authentication" not in caplog.text
        join_ray("127.0.0.2:6390")
        assert "Token authentication is enabled" in caplog.text
    assert logging.getLogger(token_setup.logger.name).level == logging.NOTSET  # put back as it was
