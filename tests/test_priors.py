"""The parts that make the priors bite: spread chosen on held-out patches, early-stopped MLP on
every position, the image score over patch averages, the paper preset."""

from __future__ import annotations

import dataclasses

import click
import numpy as np
import pytest
import torch

from pni_ray.config import NeighbourhoodConfig, TrainConfig, paper_config
from pni_ray.geometry import box_max
from pni_ray.models.neighbourhood import NeighbourhoodMLP, choose_cut
from pni_ray.models.position_prior import (
    build_position_prior,
    choose_min_count,
    choose_spread,
    held_out_keep_rate,
    position_counts,
    prior_from_counts,
)
from pni_ray.options import build_config
from pni_ray.training import HeldOut, fit_position_prior, train_neighbourhood_mlp


def _aligned(n_img: int, h: int = 6, w: int = 6, jitter: int = 0, seed: int = 0) -> torch.Tensor:
    """Nearest-entry grids of an 'object' whose entry at (y, x) is y * w + x, each image shifted by up
    to `jitter` cells (clamped at the border, so every entry stays within `jitter` of its place)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    out = []
    for _ in range(n_img):
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() if jitter else (0, 0)
        out.append((ys + dy).clamp(0, h - 1) * w + (xs + dx).clamp(0, w - 1))
    return torch.stack(out)


def test_keep_rate_counts_held_out_nearest_entries_the_prior_allows():
    prior = build_position_prior(_aligned(5), 36, spread=0)
    assert held_out_keep_rate(prior, _aligned(2), tau=0.01) == 1.0
    shifted = (_aligned(2) + 1) % 36  # every entry where it was never seen
    assert held_out_keep_rate(prior, shifted, tau=0.01) == 0.0
    partly = _aligned(2).clone()
    partly[:, :, 1:] = shifted[:, :, 1:]  # right where seen in column 0 only
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    valid[:, :, 0] = True  # only the first column is image content
    assert held_out_keep_rate(prior, partly, 0.01) == pytest.approx(1 / 6)
    assert held_out_keep_rate(prior, partly, 0.01, valid) == 1.0
    assert np.isnan(held_out_keep_rate(prior, partly, 0.01, torch.zeros_like(valid)))
    # no held-out content at all: like no held-out images, the broadest candidate
    _, spread, rates = choose_spread(_aligned(5), partly, 36, (0, 2), 0.9, 0.01, valid_held_out=torch.zeros_like(valid))
    assert spread == 2 and rates == {}


def _axis_shifted(n_img: int, seed: int, h: int = 6, w: int = 6) -> torch.Tensor:
    """Like `_aligned`, each image shifted by one cell along one axis or not at all: never diagonally."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    moves = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    out = []
    for i in torch.randint(0, len(moves), (n_img,), generator=g).tolist():
        dy, dx = moves[i]
        out.append((ys + dy).clamp(0, h - 1) * w + (xs + dx).clamp(0, w - 1))
    return torch.stack(out)


def test_spread_is_the_sharpest_that_held_out_patches_tolerate():
    train, held = _aligned(40), _aligned(10, jitter=1, seed=1)  # held-out parts sit up to a cell off
    ladder = (0, 0.5, 1, 2)
    _, spread, rates = choose_spread(_aligned(40), _aligned(10), 36, ladder, 0.9, tau=1e-3)
    assert spread == 0 and list(rates) == [0]  # a perfectly aligned object: the sharpest, nothing else tried
    _, spread, rates = choose_spread(train, held, 36, ladder, 0.9, tau=1e-3)
    assert spread == 1 and rates[0] < rates[0.5] < 0.9 <= rates[1]  # a diagonal jitter needs the 3 x 3 square
    _, spread, rates = choose_spread(train, _axis_shifted(10, seed=2), 36, ladder, 0.9, tau=1e-3)
    assert spread == 0.5 and isinstance(spread, float) and rates[0] < 0.9 and rates[0.5] == 1.0 and 1 not in rates
    counts, spread, rates = choose_spread(train, None, 36, (0, 1, 2), 0.9, tau=1e-3)
    assert spread == 2 and rates == {}  # no held-out images: the broadest
    assert torch.equal(counts, position_counts(train, 36, 2))  # the chosen spread's counts, for the count rule


def test_spreads_are_multiples_of_a_half_step():
    assert TrainConfig.from_dict({"position": {"spread": 0.5}}).position.spread == 0.5
    for bad in ({"spread": 0.3}, {"spread": -1}, {"spread": float("nan")}, {"spread": float("inf")},
                {"spread_candidates": [0, 0.25]}):
        with pytest.raises(ValueError, match="multiple of 0.5"):
            TrainConfig.from_dict({"position": bad})
    for bad in ({"spread": True}, {"spread": "1"}, {"spread_candidates": []}, {"spread_candidates": [0, "1"]}):
        with pytest.raises(ValueError, match="spread"):
            TrainConfig.from_dict({"position": bad})
    # a bundle of the earlier ladder still reads
    old = TrainConfig.from_manifest({**TrainConfig().to_dict(), "position": {"spread": 1, "spread_candidates": [0, 1, 2, 4, 8]}})
    assert old.position.spread == 1 and tuple(old.position.spread_candidates) == (0, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of 0.5"):
        choose_spread(_aligned(2), _aligned(2), 36, (0, 0.7), 0.9, tau=1e-3)


def test_min_count_leaves_out_entries_seen_too_rarely_at_a_place():
    nearest = torch.zeros(3, 1, 2, dtype=torch.long)
    nearest[0, 0, 0] = 1  # entry 1 seen once at cell 0, entry 0 twice there
    counts = position_counts(nearest, 2, spread=0)
    assert counts.tolist() == [[2.0, 1.0], [3.0, 0.0]]
    assert prior_from_counts(counts, (1, 2), 1).dense().tolist() == [[pytest.approx(2 / 3), pytest.approx(1 / 3)], [1.0, 0.0]]
    assert prior_from_counts(counts, (1, 2), 2).dense().tolist() == [[1.0, 0.0], [1.0, 0.0]]  # renormalised
    # no entry seen 3 times at cell 0: its most frequent one stays (an empty place would allow everything)
    assert build_position_prior(nearest, 2, 0, min_count=3).dense().tolist() == [[1.0, 0.0], [1.0, 0.0]]
    varied = torch.tensor([[[0]], [[1]], [[2]]])  # three images, three entries once each at the one cell
    assert build_position_prior(varied, 3, 0, min_count=2).dense().tolist() == [[pytest.approx(1 / 3)] * 3]


def test_min_count_is_the_largest_that_held_out_patches_tolerate():
    g = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 36, (1, 6, 6), generator=g)  # one odd training image: each entry seen once there
    train = torch.cat([_aligned(40), noise])
    counts, ladder = position_counts(train, 36, 0), (1, 2, 4, 16, 64)
    _, k, rates = choose_min_count(counts, (6, 6), _aligned(10), ladder, 0.9, tau=1e-3)
    assert k == 64 and set(rates.values()) == {1.0}  # each place's own entry, seen 40 times, always stays
    held = _aligned(10)
    held[:2] = noise  # two held-out images look like the odd one: they need entries seen once
    exact = (noise != _aligned(1)).float().mean().item()  # cells where the odd image differs
    _, k, rates = choose_min_count(counts, (6, 6), held, ladder, 0.9, tau=1e-3)
    assert k == 1 and rates[2] == pytest.approx(1 - 0.2 * exact) and list(rates) == list(ladder)
    assert max(rates[c] for c in ladder[1:]) < 0.9
    # the rate need not fall with the count: an entry diluted below tau at 1 passes it at 2
    spread_out = torch.zeros(40, 1, 1, dtype=torch.long)
    spread_out[:30, 0, 0] = torch.arange(30) + 1  # 30 entries once each, entry 0 ten times
    diluted = position_counts(spread_out, 31, 0)  # p(entry 0) = 0.25 at k = 1, 1.0 at k = 2
    _, k, rates = choose_min_count(diluted, (1, 1), torch.zeros(4, 1, 1, dtype=torch.long), (1, 2), 0.9, tau=0.3)
    assert rates == {1: 0.0, 2: 1.0} and k == 2
    prior, k, rates = choose_min_count(counts, (6, 6), None, ladder, 0.9, tau=1e-3)
    assert k == 1 and rates == {} and prior.prob.numel() == int((counts > 0).sum())  # nothing held out: every entry
    with pytest.raises(ValueError, match=">= 1"):
        choose_min_count(counts, (6, 6), held, (0, 1), 0.9, tau=1e-3)
    # a rate the spread rule already measured is taken, not measured again (nor one off the ladder)
    _, k, rates = choose_min_count(counts, (6, 6), held, ladder, 0.9, tau=1e-3, measured={1: 0.5, 2: 0.95, 3: 1.0})
    assert k == 2 and rates[1] == 0.5 and rates[2] == 0.95 and 3 not in rates and list(rates) == list(ladder)


def test_min_count_settings_and_older_bundles():
    assert TrainConfig().position.min_count is None and paper_config().position.min_count == 1
    assert TrainConfig.from_dict({"position": {"min_count": 2}}).position.min_count == 2
    for bad in ({"min_count": 0}, {"min_count": 1.5}, {"min_count": "2"}, {"min_count_candidates": []},
                {"min_count_candidates": [1, 2.5]}, {"min_count": True}):
        with pytest.raises(ValueError, match="min_count"):
            TrainConfig.from_dict({"position": bad})
    old = {**TrainConfig().to_dict(), "position": {"spread": None, "spread_candidates": [0, 1, 2, 4, 8], "min_keep": 0.9}}
    assert TrainConfig.from_manifest(old).position.min_count == 1  # built before the count: every entry seen once


def test_spread_falls_back_to_the_best_keep_rate_when_none_is_tolerated():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 36, (3, 6, 6), generator=g)
    held = torch.randint(0, 36, (3, 6, 6), generator=g)
    counts, spread, rates = choose_spread(train, held, 36, (0, 1, 8), 0.999, tau=1e-3)
    assert max(rates.values()) < 0.999 and rates[spread] == max(rates.values())
    assert torch.equal(counts, position_counts(train, 36, spread))  # the best spread's counts
    # the whole grid dilutes every entry below tau: the best is a middle spread, not the last tried
    odd = torch.rand(3, 6, 6, generator=g) < 0.5
    held = _aligned(3).masked_scatter(odd, torch.randint(0, 36, (int(odd.sum()),), generator=g))
    counts, spread, rates = choose_spread(_aligned(5), held, 36, (0, 1, 8), 0.999, tau=0.05)
    assert spread == 1 and rates[8] == 0.0 < rates[0] < rates[1] < 0.999
    assert torch.equal(counts, position_counts(_aligned(5), 36, 1))


def test_fit_position_prior_is_the_spread_rule_then_the_count_rule():
    g = torch.Generator().manual_seed(3)
    train = torch.cat([_aligned(40, jitter=1, seed=4), torch.randint(0, 36, (2, 6, 6), generator=g)])
    held_nearest = _aligned(10, jitter=1, seed=6)
    odd = torch.rand(held_nearest.shape, generator=g) < 0.06  # a few held-out cells no training image shows there
    held_nearest[odd] = torch.randint(0, 36, (int(odd.sum()),), generator=g)
    held = HeldOut(torch.zeros(10, 1, 6, 6), held_nearest, None)
    cfg = TrainConfig()
    tau = cfg.scoring.tau_scale / 36
    fit = fit_position_prior(held, torch.zeros(36, 1), train, None, cfg)
    _, spread, spread_keep = choose_spread(train, held.nearest, 36, cfg.position.spread_candidates,
                                           cfg.position.min_keep, tau)
    assert (fit.spread, fit.spread_keep) == (spread, spread_keep)
    expected = build_position_prior(train, 36, spread, min_count=fit.min_count)
    assert torch.equal(fit.prior.dense(), expected.dense())
    for k, rate in fit.count_keep.items():  # every count's rate, count 1's taken from the spread rule
        measured = held_out_keep_rate(build_position_prior(train, 36, spread, min_count=k), held.nearest, tau)
        assert rate == pytest.approx(measured, abs=0)
    assert fit.count_keep[1] == spread_keep[spread] < 1.0 and fit.min_count > 1
    assert fit.min_count == max(k for k, r in fit.count_keep.items() if r >= cfg.position.min_keep)
    fixed = fit_position_prior(held, torch.zeros(36, 1), train, None,
                               TrainConfig.from_dict({"position": {"spread": 1, "min_count": 3}}))
    assert (fixed.spread, fixed.min_count, fixed.spread_keep, fixed.count_keep) == (1, 3, {}, {})
    assert torch.equal(fixed.prior.dense(), build_position_prior(train, 36, 1, min_count=3).dense())


def test_box_max_averages_before_the_maximum():
    values = np.zeros((32, 32), np.float32)
    values[5, 5] = 9.0  # one hot pixel
    values[20:24, 20:24] = 4.0  # a 4 x 4 blob
    assert box_max(values, 1) == 9.0
    assert box_max(values, 4) == pytest.approx(4.0)
    assert box_max(values, 64) == pytest.approx(values.mean())  # window clipped to the map


def test_mlp_trains_on_every_position_and_keeps_its_best_epoch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 6, 8, 8, generator=g)
    targets = (feats[:, 0] > 0).long()  # learnable from the centre only: neighbours carry some signal
    cfg = NeighbourhoodConfig(window=3, bottleneck=4, hidden=8, depth=1, epochs=30, patience=1, lr=1e-2, batch_images=4)
    mlp, report = train_neighbourhood_mlp(feats, targets, 2, cfg, seed=0, progress=False)
    history = report["history"]
    assert len(history) < cfg.epochs  # stopped early
    best = min(history, key=lambda r: r["val_loss"])
    assert report["best_epoch"] == best["epoch"] and report["best"] == best
    assert history[-1]["epoch"] - report["best_epoch"] == cfg.patience
    from pni_ray.training import evaluate_mlp

    val = report["n_val_images"]
    assert val >= 1
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:val]  # same split as training
    assert evaluate_mlp(mlp, feats[perm], targets[perm])["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def _rates(cfg: NeighbourhoodConfig, batches: int) -> list[float]:
    from pni_ray.training import learning_rate_schedule

    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = learning_rate_schedule(optimiser, cfg, batches)
    rates = []
    for _ in range(cfg.epochs * batches):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    return rates


def test_mlp_learning_rate_follows_a_cosine_over_every_batch_or_the_old_steps():
    cosine = _rates(NeighbourhoodConfig(epochs=4, lr=4e-3, lr_schedule="cosine"), batches=5)
    assert len(cosine) == 20 and cosine[0] == 4e-3
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # falls at every batch, not per epoch
    assert cosine[10] == pytest.approx(2e-3) and 0 < cosine[-1] < 4e-3 * 0.01
    # "step" (the default) stepped per batch: the same rates a per-epoch StepLR gives, bit for bit
    cfg = NeighbourhoodConfig(epochs=9, lr=2e-3, lr_schedule="step", lr_step=4, lr_gamma=0.3)
    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    per_epoch = torch.optim.lr_scheduler.StepLR(optimiser, step_size=4, gamma=0.3)
    expected = []
    for _ in range(cfg.epochs):
        expected += [optimiser.param_groups[0]["lr"]] * 3
        optimiser.step()
        per_epoch.step()
    assert _rates(cfg, batches=3) == expected and expected[-1] == 2e-3 * 0.3 * 0.3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig.from_dict({"neighbourhood": {"lr_schedule": "linear"}})
    old = TrainConfig().to_dict()
    del old["neighbourhood"]["lr_schedule"]  # a manifest from before the field: its MLP trained on steps
    assert TrainConfig.from_manifest(old).neighbourhood.lr_schedule == "step" == NeighbourhoodConfig().lr_schedule


def test_mlp_training_sets_the_scheduled_rate_at_every_batch(monkeypatch):
    """Inside training: 7 training images capped at 5 per epoch in batches of 2 (the last one partial) is
    3 batches an epoch, each at the rate a per-epoch StepLR gives its epoch."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 6, 6, 6, generator=g)  # 1 validation image, 7 training images
    cfg = NeighbourhoodConfig(window=3, bottleneck=4, hidden=8, depth=1, epochs=9, patience=9, lr=2e-3,
                              batch_images=2, images_per_epoch=5, lr_step=4, lr_gamma=0.3)
    _, report = train_neighbourhood_mlp(feats, (feats[:, 0] > 0).long(), 2, cfg, seed=0, progress=False)
    assert len(report["history"]) == 9
    assert seen == [2e-3] * 12 + [2e-3 * 0.3] * 12 + [2e-3 * 0.3 * 0.3] * 3
    seen.clear()
    train_neighbourhood_mlp(feats, (feats[:, 0] > 0).long(), 2, dataclasses.replace(cfg, lr_schedule="cosine"),
                            seed=0, progress=False)
    assert len(seen) == 27 and seen[0] == 2e-3 and all(a > b for a, b in zip(seen, seen[1:]))


def test_paper_preset_and_its_full_width_mlp():
    cfg = build_config(preset="paper", epochs=2)
    assert cfg.features.image_size == 480 and cfg.features.patch_size == 5 and cfg.coreset.ratio == 0.01
    assert cfg.neighbourhood.hidden == 2048 and cfg.neighbourhood.depth == 9 and cfg.neighbourhood.bottleneck is None
    assert cfg.position.spread == 4 and cfg.scoring.combine == "mean" and cfg.scoring.blur_sigma == 8.0
    assert cfg.neighbourhood.epochs == 2  # options still override the preset
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg == dataclasses.replace(paper_config(), neighbourhood=cfg.neighbourhood)
    small = dataclasses.replace(cfg.neighbourhood, hidden=32, depth=2)
    mlp = NeighbourhoodMLP(7, 5, small)
    assert mlp.reduce.out_channels == 7 and mlp(torch.randn(1, 7, 9, 9)).shape == (1, 5, 9, 9)
    with pytest.raises(click.UsageError, match="one"):
        build_config(preset="paper", base=TrainConfig())


def test_torch_image_score_matches_the_geometry_box_maximum():
    from pni_ray.models.anomaly_map import image_scores

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 40, 56, generator=g)
    for window in (0, 1, 5, 24, 80):
        torch_scores = image_scores(maps, window)
        numpy_scores = [box_max(m.numpy(), window) for m in maps]
        assert torch.allclose(torch_scores, torch.tensor(numpy_scores, dtype=torch.float32), atol=1e-6), window


def test_neighbourhood_cut_is_the_strictest_that_held_out_patches_tolerate():
    tau = 0.01
    p = torch.tensor([0.005, 0.02, 0.05, 0.05, 0.09, 0.2, 0.3, 0.5, 0.7, 0.9])  # p(c|N) of held-out nearest entries
    cut, rates = choose_cut(p, tau, (2.0, 4.0, 8.0, 16.0), min_keep=0.8)
    assert cut == 4.0 and rates == {1.0: 0.9, 2.0: 0.8, 4.0: 0.8, 8.0: 0.6, 16.0: 0.5}  # tau is always measured
    assert choose_cut(p, tau, (2.0, 4.0), min_keep=0.95) == (1.0, {1.0: 0.9, 2.0: 0.8, 4.0: 0.8})  # none: tau
    assert choose_cut(p, tau, (2.0, 4.0, 8.0, 16.0), min_keep=0.5)[0] == 16.0
    assert choose_cut(torch.zeros(0), tau, (2.0,), 0.9) == (1.0, {})  # no held-out patches: tau
    with pytest.raises(ValueError, match=">= 1"):
        choose_cut(p, tau, (0.5, 2.0), 0.9)  # never looser than tau


@pytest.mark.parametrize("bad", [{"cut": 0.5}, {"cut": 0}, {"cut_candidates": (0.5, 2.0)}, {"cut_candidates": ()},
                                 {"min_keep": 0.0}, {"min_keep": 1.5}, {"batch_images": 0}, {"images_per_epoch": 0}])
def test_a_bad_neighbourhood_setting_fails_when_the_config_is_read(bad):
    with pytest.raises(ValueError, match="neighbourhood"):
        TrainConfig.from_dict({"neighbourhood": bad})
    assert TrainConfig.from_dict({"neighbourhood": {"cut": None}}).neighbourhood.cut is None  # JSON null: chosen
    assert TrainConfig.from_dict({"neighbourhood": {"cut": 4}}).neighbourhood.cut == 4


def test_training_chooses_the_cut_and_the_bundle_scores_with_it(synthetic_root, tmp_path):
    """The chosen cut is the rule's on this model's own held-out keep rates, is recorded, travels
    with the bundle into the scorer, and a fixed `cut` skips the choice."""
    from conftest import tiny_config

    from pni_ray.bundle import load_bundle, save_bundle
    from pni_ray.models.pni import build_detector
    from pni_ray.training import train_category

    base = tiny_config().neighbourhood
    cfg = tiny_config(neighbourhood=dataclasses.replace(base, epochs=2, min_keep=0.5))
    trained = train_category(synthetic_root, "washer", cfg, progress=False)
    facts = trained.report["deterministic"]
    rates = {float(k): v for k, v in facts["neighbourhood_held_out_keep"].items()}
    assert rates[1.0] >= rates[2.0] >= rates[4.0]  # a stricter cut never keeps more
    assert trained.neighbourhood_cut == facts["neighbourhood_cut"] == max(c for c, r in rates.items() if r >= 0.5)
    assert trained.neighbourhood_cut > 1.0
    loaded, manifest = load_bundle(save_bundle(trained, tmp_path / "b"))
    assert manifest["neighbourhood_cut"] == loaded.neighbourhood_cut == trained.neighbourhood_cut
    scorer = build_detector(loaded).scorer
    assert scorer.tau_neighbourhood == trained.neighbourhood_cut * scorer.tau
    fixed = train_category(synthetic_root, "washer", tiny_config(neighbourhood=dataclasses.replace(base, epochs=2, cut=3.0)),
                           progress=False)
    assert fixed.neighbourhood_cut == 3.0 and fixed.report["deterministic"]["neighbourhood_held_out_keep"] == {}


def test_bundles_from_before_the_neighbourhood_cut_score_at_tau(bundle_tiny, tmp_path):
    """A manifest without neighbourhood_cut (and a config without neighbourhood.cut) cut p(c|N) at tau."""
    import json
    import shutil

    from pni_ray.bundle import MANIFEST, load_bundle
    from pni_ray.fileio import sha256_file

    old = tmp_path / "old"
    shutil.copytree(bundle_tiny, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["neighbourhood_cut"] = 7.0
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert load_bundle(old)[0].neighbourhood_cut == 7.0  # the recorded cut rules
    del manifest["neighbourhood_cut"], manifest["config"]["neighbourhood"]["cut"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    trained, _ = load_bundle(old)
    assert trained.neighbourhood_cut == 1.0 and trained.config.neighbourhood.cut == 1.0
    assert sha256_file(old / "memory.arrow") == sha256_file(bundle_tiny / "memory.arrow")


def test_bundles_from_before_the_scoring_fields_keep_their_rule():
    """A manifest without scoring.combine / image_window was calibrated on the mean rule and the plain maximum."""
    from pni_ray.config import LEGACY_SCORING
    from pni_ray.geometry import Geometry

    old = TrainConfig().to_dict()
    for key in LEGACY_SCORING:
        del old["scoring"][key]
    cfg = TrainConfig.from_manifest(old)
    assert cfg.scoring.combine == "mean" and cfg.scoring.image_window == 0
    assert Geometry.from_manifest({"config": old, "grid": [32, 32]}).image_window == 0
    assert TrainConfig.from_manifest(TrainConfig().to_dict()) == TrainConfig()  # new bundles: as recorded
    assert TrainConfig.from_dict(old).scoring.combine == "both"  # a user's config file: today's defaults


def test_bundles_from_before_pool_padding_keep_their_border_features():
    """A manifest without features.pool_padding built its bank from border patches averaged over the cells
    inside the grid; loading it must extract features the same way, while a config file gets today's zeros."""
    old = TrainConfig().to_dict()
    del old["features"]["pool_padding"]
    assert TrainConfig.from_manifest(old).features.pool_padding == "inside"
    assert TrainConfig.from_dict(old).features.pool_padding == "zeros"
    assert TrainConfig.from_manifest(TrainConfig().to_dict()).features.pool_padding == "zeros"


def test_defect_cells_ignore_padding_and_cover_the_last_partial_cell():
    from pni_ray.config import GeometryConfig
    from pni_ray.evaluate import defect_cells
    from pni_ray.geometry import Geometry

    mask = np.zeros((80, 128), bool)
    mask[:, 120:] = True  # the last 8 columns
    letterbox = Geometry(GeometryConfig(policy="letterbox", pad_value=255), 128)
    cells = defect_cells(letterbox, mask)
    assert cells.shape == letterbox.prepare(np.zeros((80, 128, 3), np.uint8)).grid
    assert cells[:, -1].sum() == 10 and cells.sum() == 10  # the content rows of the last column, no padding
    odd = Geometry(GeometryConfig(), 100)  # a 100 px canvas: a 13 x 13 grid, the last cell partial
    assert defect_cells(odd, np.ones((50, 50), bool)).shape == (13, 13)


def test_mlp_epochs_visit_at_most_images_per_epoch():
    """Big categories: each epoch a fresh seeded draw of images_per_epoch images, not all of them."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 6, 8, 8, generator=g)
    targets = (feats[:, 0] > 0).long()
    base = NeighbourhoodConfig(window=3, bottleneck=4, hidden=8, depth=1, epochs=2, patience=5, batch_images=4)
    _, capped = train_neighbourhood_mlp(feats, targets, 2, dataclasses.replace(base, images_per_epoch=5), 0, False)
    _, full = train_neighbourhood_mlp(feats, targets, 2, dataclasses.replace(base, images_per_epoch=None), 0, False)
    assert [r["train_images"] for r in capped["history"]] == [5, 5]
    assert [r["train_images"] for r in full["history"]] == [11, 11]  # 12 images, 1 held for validation
    again = train_neighbourhood_mlp(feats, targets, 2, dataclasses.replace(base, images_per_epoch=5), 0, False)[1]
    assert again["history"] == capped["history"]  # seeded


def test_bf16_mlp_training_learns_as_float32_does_and_is_refused_where_emulated(monkeypatch):
    """bfloat16: autocast training steps, fp32 weights; refused on CPUs without native bf16, where the
    default 'auto' trains in float32 instead."""
    from pni_ray import training

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 6, 8, 8, generator=g)
    targets = (feats[:, 0] > 0).long()
    base = NeighbourhoodConfig(window=3, bottleneck=4, hidden=8, depth=1, epochs=6, patience=6, lr=1e-2, batch_images=4,
                               train_precision="float32")
    assert build_config(mlp_precision="bfloat16").neighbourhood.train_precision == "bfloat16"
    assert build_config().neighbourhood.train_precision == "auto"
    bf16 = dataclasses.replace(base, train_precision="bfloat16")
    auto = dataclasses.replace(base, train_precision="auto")
    if training.native_bf16():
        mlp32, rep32 = train_neighbourhood_mlp(feats, targets, 2, base, 0, False)
        mlp16, rep16 = train_neighbourhood_mlp(feats, targets, 2, bf16, 0, False)
        assert (rep32["precision"], rep16["precision"]) == ("float32", "bfloat16")
        assert all(p.dtype == torch.float32 for p in mlp16.parameters())
        assert not torch.equal(mlp16.classifier.weight, mlp32.classifier.weight)  # autocast was on
        assert rep16["best"]["val_loss"] == pytest.approx(rep32["best"]["val_loss"], rel=0.05)
        assert rep16 == train_neighbourhood_mlp(feats, targets, 2, bf16, 0, False)[1]  # seeded
        mlp_auto, rep_auto = train_neighbourhood_mlp(feats, targets, 2, auto, 0, False)
        assert rep_auto == rep16 and torch.equal(mlp_auto.classifier.weight, mlp16.classifier.weight)
    monkeypatch.setattr(training, "native_bf16", lambda: False)
    mlp_auto, rep_auto = train_neighbourhood_mlp(feats, targets, 2, auto, 0, False)
    mlp32, rep32 = train_neighbourhood_mlp(feats, targets, 2, base, 0, False)
    assert rep_auto == rep32 and rep_auto["precision"] == "float32"
    assert torch.equal(mlp_auto.classifier.weight, mlp32.classifier.weight)
    with pytest.raises(ValueError, match="native bf16"):
        train_neighbourhood_mlp(feats, targets, 2, bf16, 0, False)
    seen = []  # refused before any image is read or feature computed
    monkeypatch.setattr(training, "load_category", lambda *a, **k: seen.append(a))
    with pytest.raises(ValueError, match="--mlp-precision float32"):
        training.train_category("nowhere", "c", build_config(mlp_precision="bfloat16"), progress=False)
    assert seen == []
    with pytest.raises(ValueError, match="float16"):
        training.training_precision("float16")


@pytest.mark.parametrize("eval_rows", [100, 2500, 5000, 8 * 40 * 40])
def test_mlp_validation_matches_the_plain_definition_and_respects_valid_and_idx(monkeypatch, eval_rows):
    """evaluate_mlp (channels-last batches, top-k by counting higher classes) gives the textbook
    cross-entropy / argmax / topk figures of the full logits, over the chosen images and valid
    positions only, whatever its batching."""
    import torch.nn.functional as F

    from pni_ray import training
    from pni_ray.models.neighbourhood import NeighbourhoodMLP
    from pni_ray.training import evaluate_mlp

    monkeypatch.setattr(training, "EVAL_ROWS", eval_rows)  # batches of 1 (grid > budget), 1, 2 and 3 images
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    mlp = NeighbourhoodMLP(6, 9, NeighbourhoodConfig(window=3, bottleneck=4, hidden=8, depth=1)).eval()
    feats, targets = torch.randn(7, 6, 50, 50, generator=g), torch.randint(0, 9, (7, 50, 50), generator=g)
    valid = torch.rand(7, 50, 50, generator=g) > 0.3
    idx = torch.tensor([5, 0, 3])  # 2,500 positions per image

    def reference(keep: torch.Tensor) -> dict:
        with torch.no_grad():
            logits = mlp(feats[idx]).permute(0, 2, 3, 1).reshape(-1, 9)[keep]
        labels = targets[idx].reshape(-1)[keep]
        top5 = (logits.topk(5, dim=1).indices == labels.unsqueeze(1)).any(1).float().mean()
        return {"val_loss": float(F.cross_entropy(logits, labels)), "val_top1": float((logits.argmax(1) == labels).float().mean()),
                "val_top5": float(top5)}

    for mask, keep in ((None, torch.ones(3 * 2500, dtype=torch.bool)), (valid, valid[idx].reshape(-1))):
        got, want = evaluate_mlp(mlp, feats, targets, mask, idx), reference(keep)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
        assert got["val_top1"] == pytest.approx(want["val_top1"], abs=1e-6)
        assert got["val_top5"] == pytest.approx(want["val_top5"], abs=1e-6)
    assert evaluate_mlp(mlp, feats, targets, torch.zeros_like(valid), idx)["val_loss"] == 0.0  # nothing valid


def test_mlp_validation_ranks_ties_as_argmax_and_topk_do_and_nan_rows_as_wrong():
    from pni_ray.training import _classes_ahead

    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0], [0.0, float("nan"), 1.0, 5.0]])
    labels = torch.tensor([2, 0, 3, 3])
    # row 0: class 1 ties the label at a lower index; row 1: the label is the first of four ties;
    # row 2: the last of four; row 3 holds NaN
    assert _classes_ahead(rows, labels, check_nan=True).tolist() == [1, 0, 3, 4]
    assert rows[:3].argmax(1).eq(labels[:3]).tolist() == [False, True, False]
