"""`pni-ray demo`: the whole product on built-in synthetic data, in a few minutes on 2 cores."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from pni_ray.bundle import atomic_write_json, save_bundle
from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.data.synthetic import CATEGORIES, make_synthetic
from pni_ray.evaluate import ABLATION_MODES, evaluate_category
from pni_ray.inference import load_detector
from pni_ray.training import train_category

log = logging.getLogger(__name__)


def run_demo(workdir: Path, categories: tuple[str, ...] = CATEGORIES, cfg: TrainConfig | None = None) -> dict:
    """Make data, train each category, evaluate every mode; returns {category: {mode: metrics}}."""
    cfg = cfg or TrainConfig()
    workdir = Path(workdir)
    data = workdir / "data"
    t0 = time.perf_counter()
    click.echo(f"[1/3] synthetic data -> {data}")
    make_synthetic(data, seed=cfg.seed, categories=list(categories))
    results: dict[str, dict] = {}
    for cat_name in categories:
        bundle = workdir / "bundles" / cat_name
        click.echo(f"[2/3] training {cat_name} -> {bundle}")
        trained = train_category(data, cat_name, cfg)
        save_bundle(trained, bundle, overwrite=True)
        click.echo(f"[3/3] evaluating {cat_name}")
        detector, _ = load_detector(bundle)
        results[cat_name] = evaluate_category(detector, load_category(data, cat_name), modes=ABLATION_MODES)
    from pni_ray.cli import print_table

    for cat_name, rows in results.items():
        click.echo(f"\n{cat_name}")
        print_table(rows)
    atomic_write_json(workdir / "demo_metrics.json", results)
    click.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; metrics: {workdir / 'demo_metrics.json'}")
    return results
