"""Real MVTec AD transistor (read in place from ../shared; skipped when absent): PNI must beat its
own PatchCore mode, so the gain of the position and neighbourhood priors cannot silently vanish.

Transistor is the category the priors exist for: a `misplaced` transistor (missing or rotated)
is made of patches that look normal somewhere; only where they are says they are wrong. Reduced
for CI: a 1% coreset (the authors' ratio) and 3 MLP epochs; everything else at the defaults.
Measured at this config (320 px, 1 or 2 torch threads alike), with PatchCore's zero padding at the
grid's border (features.pool_padding "zeros"): pni - patchcore = +0.0200 pixel AUROC (0.9692 -> 0.9892),
+0.0217 AUPRO (0.9374 -> 0.9591), image AUROC 0.9996 -> 1.0000 (patchcore's border artifact gone, image
AUROC leaves no margin to ask for), with p(c|N) cut at the chosen 2 tau (held-out keep 0.9973 >= the
0.99 asked, 4 tau 0.9892; at the earlier 0.95 it took 8 tau: +0.0198 / +0.0215); the margins keep about
half of each. Before the border change (cells outside not counted):
+0.0268 / +0.0402 / +0.0121 from a patchcore of 0.9571 / 0.9046 / 0.9792.
The MLP's held-out top-1 after its 3 epochs: 0.582 at the default steps, 2 images per step at lr 2e-3
(0.587 before the border change); 0.372 at the previous 8 images per step, lr 1e-3, whose MLP had not
converged in 12.
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
PIXEL_MARGIN = 0.010
AUPRO_MARGIN = 0.011
MIN_IMAGE_AUROC = 0.995  # measured 1.0000 for pni (patchcore 0.9996)
MIN_MLP_TOP1 = 0.5  # measured 0.582 (see the module doc)


@pytest.fixture(scope="module")
def transistor_results(transistor_root):
    """The suite's longest job: up to 2 torch threads, as many as this test process has cores for."""
    with both_cores():
        return _train_and_evaluate(transistor_root)


def _train_and_evaluate(transistor_root):
    cfg = TrainConfig()
    # float32 MLP steps on every CPU ("auto" takes bf16 where native): the chosen p(c|N) cut can sit near a
    # boundary at this reduced config (before the border change 16 tau kept 0.949 of held-out patches
    # against 0.95), so the figures above are pinned to the float32 MLP they were measured with
    cfg = cfg.replace(coreset=dataclasses.replace(cfg.coreset, ratio=0.01),
                      neighbourhood=dataclasses.replace(cfg.neighbourhood, epochs=3, train_precision="float32"))
    trained = train_category(transistor_root, "transistor", cfg, progress=False)
    detector = build_detector(trained)
    cat = load_category(transistor_root, "transistor")
    modes = ("patchcore", "position", "pni")
    results = evaluate_category(detector, cat, modes=modes, progress=False)
    # a quarter of the images: ratios, not metrics (measured on every 4th / every 2nd image, 2 threads: defect / good
    # patches changed 15.4x / 13.3x, mean score change 118x / 90x, against the 5x and 20x asked; 5.5 s / 11.2 s)
    every_fourth = dataclasses.replace(cat, test=cat.test[::4])
    return trained, results, prior_diagnostics(detector, every_fourth, ("pni",), progress=False)


@pytest.mark.slow
def test_pni_beats_patchcore_on_transistor(transistor_results):
    _, results, _ = transistor_results
    pni, patchcore = results["pni"], results["patchcore"]
    assert pni["pixel_auroc"] >= patchcore["pixel_auroc"] + PIXEL_MARGIN, results
    assert pni["aupro"] >= patchcore["aupro"] + AUPRO_MARGIN, results
    # patchcore's 0.9996 is one (defect, good) pair from 1.0: pni may not fall below it by more than one more
    assert pni["image_auroc"] >= MIN_IMAGE_AUROC and pni["image_auroc"] >= patchcore["image_auroc"] - 0.001, results


@pytest.mark.slow
def test_pni_keeps_what_the_position_prior_finds(transistor_results):
    """Combining with p(c|N) must not give back what p(c|x) alone finds over patchcore (the paper's
    mean gave back nearly all of it). The chosen p(c|N) cut trades both ways (measured at this config:
    pni - position +0.0001 pixel AUROC, -0.0002 AUPRO), so the check is on the share of position's gain
    that pni keeps, not on equality; image AUROC, 1.0000 in both, must not fall below position's."""
    _, results, _ = transistor_results
    for key in ("pixel_auroc", "aupro"):
        gain = results["position"][key] - results["patchcore"][key]
        assert gain > 0, (key, results)
        assert results["pni"][key] - results["patchcore"][key] >= 0.75 * gain, (key, results)
    assert results["pni"]["image_auroc"] >= results["position"]["image_auroc"] - 0.002, results


@pytest.mark.slow
def test_the_prior_bites_on_defects_not_on_good_images(transistor_results):
    trained, _, diagnostics = transistor_results
    d = diagnostics["pni"]
    assert d["changed_defect"] > 5 * d["changed_normal"], d
    assert d["score_change_defect"] > 20 * d["score_change_normal"], d
    assert trained.report["deterministic"]["position_spread"] == 0  # an aligned object: the sharpest prior


@pytest.mark.slow
def test_the_position_check_keeps_the_prior_where_parts_lie_where_they_belong(transistor_results):
    """Synthetic misplaced parts and CutPastes on transistor's held-out images score higher in position mode than
    in PatchCore mode (the default bundle, three draws: +0.004 to +0.009 pixel AUROC and AUPRO), so the bundle
    deploys pni; a check that dropped the prior here would throw away the gain asserted above."""
    trained, _, _ = transistor_results
    check = trained.report["deterministic"]["position_check"]
    assert check["kept"] and trained.config.scoring.mode == "pni", check
    for key in ("pixel_auroc", "aupro"):
        assert check["position"][key] > check["patchcore"][key], check


@pytest.mark.slow
def test_the_neighbourhood_mlp_learns_its_task(transistor_results):
    """p(c|N) is only as good as the MLP: an under-trained one (too few optimiser steps) predicts the
    centre's C_dist entry far less often on held-out images."""
    trained, _, _ = transistor_results
    best = trained.report["deterministic"]["mlp"]["best"]
    assert best["val_top1"] >= MIN_MLP_TOP1, best


@pytest.mark.slow
def test_the_neighbourhood_cut_is_chosen_above_tau(transistor_results):
    """A trained MLP is confident enough on held-out good patches for a cut above tau (measured 2 tau at
    this config: held-out keep 0.9973, 4 tau 0.9892 < 0.99), and the chosen cut keeps >= min_keep."""
    trained, _, _ = transistor_results
    facts = trained.report["deterministic"]
    cut, keep = facts["neighbourhood_cut"], facts["neighbourhood_held_out_keep"]
    assert cut > 1.0 and trained.neighbourhood_cut == cut, facts
    assert keep[f"{cut:g}"] >= trained.config.neighbourhood.min_keep, keep
