"""`pni-ray demo`: the whole product on built-in synthetic data, in a few minutes on 2 cores.

synthetic data -> train-all (Ray) -> ablation table -> ONNX export -> Ray Data scoring of the
test images to Parquet (through the torch-free runtime) -> HTML reports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import click

from pni_ray.bundle import atomic_write_json
from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.data.synthetic import CATEGORIES, SYNTHETIC_SIZE, make_synthetic
from pni_ray.evaluate import ABLATION_MODES, evaluate_category
from pni_ray.inference import load_detector

log = logging.getLogger(__name__)


def run_demo(workdir: Path, categories: tuple[str, ...] = CATEGORIES, cfg: TrainConfig | None = None) -> dict:
    """Run every stage; returns {"metrics": {category: {mode: metrics}}, "artefacts": {...}}."""
    import ray

    from pni_ray.export.onnx_export import export_bundle
    from pni_ray.options import print_table
    from pni_ray.orchestration.score import Options, ensure_ray, score
    from pni_ray.orchestration.train_all import train_all
    from pni_ray.report import write_report

    if cfg is None:  # the synthetic images are SYNTHETIC_SIZE px: train at their own resolution
        base = TrainConfig()
        cfg = base.replace(features=dataclasses.replace(base.features, image_size=SYNTHETIC_SIZE))
    workdir = Path(workdir).resolve()
    data, bundles = workdir / "data", workdir / "bundles"
    t0 = time.perf_counter()
    click.echo(f"[1/5] synthetic data ({', '.join(categories)}) -> {data}")
    make_synthetic(data, seed=cfg.seed, categories=list(categories))

    click.echo(f"[2/5] train-all on local Ray -> {bundles}")
    result = train_all(data, bundles, cfg, categories=list(categories), cpus_per_task=1, force=True)
    if not result.ok:
        raise click.ClickException(f"training failed: {result.failed}")
    backbone = cfg.features.backbone

    click.echo("[3/5] ablation per category (scoring modes of the same bundle)")
    metrics: dict[str, dict] = {}
    for cat in categories:
        detector, _ = load_detector(bundles / cat / backbone)
        metrics[cat] = evaluate_category(detector, load_category(data, cat), modes=ABLATION_MODES, progress=False)
        click.echo(f"\n{cat}")
        print_table(metrics[cat])

    click.echo("\n[4/5] ONNX export (+ Arrow coresets) per category")
    exports = {}
    for cat in categories:
        exports[cat] = export_bundle(bundles / cat / backbone, workdir / "export" / cat, force=True).path

    click.echo("[5/5] Ray Data scoring of the test images to Parquet, then HTML reports")
    started = ensure_ray()
    artefacts: dict[str, dict[str, str]] = {}
    try:
        for cat in categories:
            out = workdir / "scores" / cat
            summary = score(exports[cat], [str(data / cat / "test")], out, Options(map_format="uint8"))
            html = workdir / "reports" / f"{cat}.html"
            write_report(out, html, title=f"pni-ray demo: {cat}")
            artefacts[cat] = {"bundle": str(bundles / cat / backbone), "export": str(exports[cat]),
                              "scores": str(out), "report": str(html)}
            click.echo(f"  {cat}: {summary['scored']} scored, {summary['failed']} failed, "
                       f"{summary['anomalous']} anomalous -> {html}")
    finally:
        if started:
            ray.shutdown()
    atomic_write_json(workdir / "demo_metrics.json", {"metrics": metrics, "artefacts": artefacts})
    click.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    click.echo(f"  training summary: {bundles / 'summary.json'} (and summary.parquet)")
    for cat, paths in artefacts.items():
        click.echo(f"  {cat}: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    click.echo(f"  metrics: {workdir / 'demo_metrics.json'}")
    return {"metrics": metrics, "artefacts": artefacts}
