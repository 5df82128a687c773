"""One category trained the same way by `pni-ray train` and by each `train-all` task.

torch's CPU kernels split reductions by thread, so the thread count changes the floats and
with them the bundle's bytes. Both paths therefore train through `fit_category`, which sets an
explicit thread count (options.training_threads: a fixed default, never "all cores") and records
it in the manifest (`training.torch_threads`), so the same data, config, seed and thread count
give the same bundle wherever it is trained on the same CPU type (the default MLP precision,
"auto", follows the CPU: see NeighbourhoodConfig.train_precision).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import Category
from pni_ray.models.pni import TrainedModel


def record_threads(trained: TrainedModel, threads: int, stage: str | None = None) -> None:
    """Note the torch thread count and the CPU's kernel level in the facts the manifest stores: the PNI model's
    (`training.torch_threads`), or a later stage's (`training.refiner.torch_threads`), which
    `pni-ray refine` may train with another count than its parent bundle's."""
    report = trained.report if isinstance(trained.report, dict) else {}
    facts = report.setdefault("deterministic", {})
    where = facts.setdefault(stage, {}) if stage else facts
    where["torch_threads"] = int(threads)
    # the kernel level MKL and oneDNN dispatch on (AVX2, AVX512, ...): bundles match only where it does. Not the CPU's
    # name, which would give identical weights another model_id on a host that names its CPU otherwise
    where["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    trained.report = report


def fit_category(
    data_root: Path | str,
    category: str,
    cfg: TrainConfig,
    threads: int,
    progress: bool = True,
    category_data: Category | None = None,
) -> TrainedModel:
    """Train CATEGORY (and its refiner when the config enables it) with exactly `threads` torch threads."""
    from pni_ray.allocator import keep_freed_memory
    from pni_ray.training import train_category

    keep_freed_memory()  # no page faults on every large tensor (pni_ray.allocator)
    torch.set_num_threads(int(threads))
    if cfg.refiner.enabled:  # its encoder's weights refused now, not after the PNI model has trained
        from pni_ray.models.refiner import build_refiner

        build_refiner(cfg.refiner)
    trained = train_category(data_root, category, cfg, progress=progress, category_data=category_data)
    if cfg.refiner.enabled:
        from pni_ray.refine_training import train_refiner

        train_refiner(trained, data_root, category, progress=progress)
        record_threads(trained, threads, "refiner")
    record_threads(trained, threads)
    return trained
