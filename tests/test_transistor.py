"""Real MVTec AD transistor (read in place from ../shared; skipped when absent): PNI must beat its
own PatchCore mode, so the gain of the position and neighbourhood priors cannot silently vanish.

Transistor is the category the priors exist for: a `misplaced` transistor (missing or rotated)
is made of patches that look normal somewhere; only where they are says they are wrong. Reduced
for CI: a 1% coreset (the authors' ratio) and 3 MLP epochs; everything else at the defaults.
Measured at this config (320 px, 2 torch threads): pni - patchcore = +0.0268 pixel AUROC (0.9571 ->
0.9839), +0.0402 AUPRO (0.9046 -> 0.9448), +0.0121 image AUROC (0.9792 -> 0.9912), with p(c|N) cut at
the chosen 8 tau (at tau: +0.0266 / +0.0381 / +0.0141); the margins keep about half of each. Under the
suite's `-n 2` the fit runs on 1 thread (`both_cores`): the same cut (16 tau keeps 0.9486) and
+0.0267 / +0.0393 / +0.0121.
The MLP's held-out top-1 after its 3 epochs: 0.587 at the default steps (2 images per step, lr 2e-3),
0.372 at the previous 8 images per step, lr 1e-3, whose MLP had not converged in 12.
"""

from __future__ import annotations

import dataclasses
import pytest

from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.evaluate import evaluate_category, prior_diagnostics
from pni_ray.models.pni import build_detector
from pni_ray.training import train_category
from conftest import both_cores

# margins: the measured gains at this config with about half as slack (see the module doc)
PIXEL_MARGIN = 0.013
IMAGE_MARGIN = 0.007
AUPRO_MARGIN = 0.019
MIN_MLP_TOP1 = 0.5  # measured 0.587 (see the module doc)


@pytest.fixture(scope="module")
def transistor_results(transistor_root):
    """The suite's longest job: up to 2 torch threads, as many as this test process has cores for."""
    with both_cores():
        return _train_and_evaluate(transistor_root)


def _train_and_evaluate(transistor_root):
    cfg = TrainConfig()
    # float32 MLP steps on every CPU ("auto" takes bf16 where native): the chosen p(c|N) cut sits near a
    # boundary at this reduced config (16 tau keeps 0.949 of held-out patches against 0.95), so the
    # figures below are pinned to the float32 MLP they were measured with
    cfg = cfg.replace(coreset=dataclasses.replace(cfg.coreset, ratio=0.01),
                      neighbourhood=dataclasses.replace(cfg.neighbourhood, epochs=3, train_precision="float32"))
    trained = train_category(transistor_root, "transistor", cfg, progress=False)
    detector = build_detector(trained)
    cat = load_category(transistor_root, "transistor")
    modes = ("patchcore", "position", "pni")
    results = evaluate_category(detector, cat, modes=modes, progress=False)
    every_other = dataclasses.replace(cat, test=cat.test[::2])  # half the images: ratios, not metrics
    return trained, results, prior_diagnostics(detector, every_other, ("pni",), progress=False)


@pytest.mark.slow
def test_pni_beats_patchcore_on_transistor(transistor_results):
    _, results, _ = transistor_results
    pni, patchcore = results["pni"], results["patchcore"]
    assert pni["pixel_auroc"] >= patchcore["pixel_auroc"] + PIXEL_MARGIN, results
    assert pni["aupro"] >= patchcore["aupro"] + AUPRO_MARGIN, results
    assert pni["image_auroc"] >= patchcore["image_auroc"] + IMAGE_MARGIN, results


@pytest.mark.slow
def test_pni_keeps_what_the_position_prior_finds(transistor_results):
    """Combining with p(c|N) must not give back what p(c|x) alone finds over patchcore (the paper's
    mean gave back nearly all of it). The chosen p(c|N) cut trades both ways at this config
    (8 tau against tau: -0.0021 image AUROC, +0.0002 pixel AUROC, +0.0021 AUPRO), so the
    check is on the share of position's gain that pni keeps, not on equality."""
    _, results, _ = transistor_results
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        gain = results["position"][key] - results["patchcore"][key]
        assert gain > 0, (key, results)
        assert results["pni"][key] - results["patchcore"][key] >= 0.75 * gain, (key, results)


@pytest.mark.slow
def test_the_prior_bites_on_defects_not_on_good_images(transistor_results):
    trained, _, diagnostics = transistor_results
    d = diagnostics["pni"]
    assert d["changed_defect"] > 5 * d["changed_normal"], d
    assert d["score_change_defect"] > 20 * d["score_change_normal"], d
    assert trained.report["deterministic"]["position_spread"] == 0  # an aligned object: the sharpest prior


@pytest.mark.slow
def test_the_neighbourhood_mlp_learns_its_task(transistor_results):
    """p(c|N) is only as good as the MLP: an under-trained one (too few optimiser steps) predicts the
    centre's C_dist entry far less often on held-out images."""
    trained, _, _ = transistor_results
    best = trained.report["deterministic"]["mlp"]["best"]
    assert best["val_top1"] >= MIN_MLP_TOP1, best


@pytest.mark.slow
def test_the_neighbourhood_cut_is_chosen_above_tau(transistor_results):
    """A trained MLP is confident enough on held-out good patches for a cut above tau (measured 8 tau at
    this config: held-out keep 0.979, 16 tau 0.949 < 0.95), and the chosen cut keeps >= min_keep."""
    trained, _, _ = transistor_results
    facts = trained.report["deterministic"]
    cut, keep = facts["neighbourhood_cut"], facts["neighbourhood_held_out_keep"]
    assert cut > 1.0 and trained.neighbourhood_cut == cut, facts
    assert keep[f"{cut:g}"] >= trained.config.neighbourhood.min_keep, keep
