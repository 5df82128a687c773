"""Shared fixtures: tiny synthetic categories and a small, fast training config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("PNI_RAY_TEST_THREADS", "1")))

from pni_ray.config import CoresetConfig, FeatureConfig, NeighbourhoodConfig, ScoringConfig, TrainConfig  # noqa: E402

BOTTLE_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def tiny_config(**changes) -> TrainConfig:
    """Seconds-scale training: 128 px, lite0, small C_dist and MLP."""
    cfg = TrainConfig(
        features=FeatureConfig(backbone="efficientnet_lite0", image_size=128),
        coreset=CoresetConfig(ratio=0.1, min_size=64, max_size=2048),
        neighbourhood=NeighbourhoodConfig(dist_size=64, hidden=64, bottleneck=16, epochs=3, window=5),
        scoring=ScoringConfig(holdout_fraction=0.15, blur_sigma=2.0),
        batch_size=8,
    )
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from pni_ray.data.synthetic import SyntheticSpec, make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, seed=0, spec=SyntheticSpec(size=128, n_train=16, n_test_good=4, n_test_defect_per_type=2))
    return root


@pytest.fixture(scope="session")
def trained_tiny(synthetic_root):
    from pni_ray.training import train_category

    return train_category(synthetic_root, "washer", tiny_config(), progress=False)


@pytest.fixture(scope="session")
def bundle_tiny(trained_tiny, tmp_path_factory) -> Path:
    from pni_ray.bundle import save_bundle

    return save_bundle(trained_tiny, tmp_path_factory.mktemp("bundles") / "washer")


def strict_json(path: Path):
    """Parse as a strict reader (JavaScript's JSON.parse) would: Infinity and NaN are not JSON."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def real_category_root(category: str) -> Path:
    """The MVTec AD root holding `category`, read in place; the test is skipped when it is absent."""
    if not (BOTTLE_ROOT / category / "train" / "good").is_dir():
        pytest.skip(f"real data not present at {BOTTLE_ROOT / category}")
    return BOTTLE_ROOT


def cores_per_worker() -> int:
    """The cores this test process may use: all of them, or its share under pytest-xdist's `-n N`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@contextlib.contextmanager
def both_cores():
    """Torch on up to 2 threads for a real-data job when this process has the cores to itself (the
    suite's default is 1 thread; beside another busy process 2 threads ran 5-7x slower, so under
    `-n 2` on 2 cores it stays at 1), then the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, cores_per_worker()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    return real_category_root("bottle")


@pytest.fixture(scope="session")
def transistor_root() -> Path:
    return real_category_root("transistor")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """CLI commands under test may widen torch's thread pool; results depend on it, so reset, also
    after the test: a module- or session-scoped fixture is set up before this one runs, so a thread
    count left by the previous module's last test would reach it (an in-process `score` left 2, and
    the next module's INT8 export, calibrated at 2 threads, differed from one made at 1)."""
    threads = int(os.environ.get("PNI_RAY_TEST_THREADS", "1"))
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(threads)


# the longest modules first: under `-n 2` (pyproject's addopts) the last minutes are short tests, not a real-data fit
SLOW_MODULES_FIRST = ("test_transistor.py", "test_cluster.py", "test_bottle.py", "test_score.py", "test_deploy_parity.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every module keeps its order


class SigtermReachedTheTest(Exception):
    """Raised by `sigterm_guard`'s handler: the code under test did not handle SIGTERM itself."""


@pytest.fixture
def sigterm_guard():
    """While the test runs, SIGTERM raises SigtermReachedTheTest (restored after), so code that should
    handle SIGTERM itself and does not fails the test instead of killing the test process; yields
    the handler, which the code under test must give back when it is done."""
    import signal

    def _raise(signum, frame):
        raise SigtermReachedTheTest

    before = signal.signal(signal.SIGTERM, _raise)
    yield _raise
    signal.signal(signal.SIGTERM, before)
