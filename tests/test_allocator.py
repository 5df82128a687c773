"""pni_ray.allocator: glibc keeps freed memory, so large allocations stop faulting pages in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pni_ray import allocator

REPO = Path(__file__).resolve().parents[1]

# a fresh process each time: the policy is process-wide and applied once. RSS, not page faults:
# with transparent huge pages the kernel faults 2 MB at a time but still zeroes every byte
MB = 2**20
RSS = """
import os, sys
import numpy as np
sys.path.insert(0, {repo!r})
from pni_ray.allocator import keep_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
applied = keep_freed_memory()
start = rss()
a = np.ones(100 * 2**20 // 8); del a  # 100 MB, above glibc's largest mmap threshold (32 MiB)
freed = rss()
a = np.ones(100 * 2**20 // 8); del a
again = rss()
print(applied, freed - start, again - freed)
"""


def _rss_after_free(policy: str) -> tuple[bool, int, int]:
    env = {**os.environ, allocator.ENV: policy}
    out = subprocess.run([sys.executable, "-c", RSS.format(repo=str(REPO))], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_stays_and_is_reused() -> None:
    kept, kept_freed, kept_again = _rss_after_free("keep")
    system, system_freed, _ = _rss_after_free("system")
    assert kept and not system
    assert system_freed < 20 * MB  # glibc's default: the 100 MB went back to the kernel (and comes back zeroed)
    assert kept_freed > 90 * MB  # kept: still the process's after the free...
    assert kept_again < 10 * MB  # ...and the next 100 MB reuse it instead of mapping new pages


def test_a_bad_policy_names_the_variable_and_the_choices(monkeypatch) -> None:
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match="PNI_RAY_MALLOC='jemalloc': use one of keep, system"):
        allocator.keep_freed_memory()


def test_the_cli_refuses_a_bad_policy_before_any_work(monkeypatch) -> None:
    from click.testing import CliRunner

    from pni_ray.cli import main

    monkeypatch.setenv(allocator.ENV, "jemalloc")
    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 2 and "PNI_RAY_MALLOC='jemalloc'" in result.output


def test_training_and_scoring_processes_apply_the_policy(bundle_tiny: Path, synthetic_root: Path, monkeypatch) -> None:
    """fit_category (train, each train-all task) and ScoreWorker (each scoring actor) call it: they run in
    Ray worker processes that never pass through the CLI."""
    from conftest import tiny_config

    from pni_ray.fit import fit_category
    from pni_ray.orchestration.score import ScoreWorker

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    ScoreWorker(str(bundle_tiny), threads=1)
    assert calls == [1]
    fit_category(synthetic_root, "washer", tiny_config(), threads=1, progress=False)
    assert calls == [1, 1]
