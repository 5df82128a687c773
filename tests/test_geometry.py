"""Image geometry: letterbox / short-side / tiling, maps at the original size, pixel limit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pni_ray.bundle import load_bundle, save_bundle
from pni_ray.config import GeometryConfig, TrainConfig
from pni_ray.data.mvtec import derive_category
from pni_ray.models.coreset import candidate_rows
from pni_ray.predict import extract_training_features
from pni_ray.geometry import STRIDE, Geometry, GeometryError, blend_weights, resize_map, stitch, tile_starts, to_float
from pni_ray.predict import features as geometry_features
from pni_ray.predict import detector_geometry, predict_images
from pni_ray.data.images import DEFAULT_MAX_PIXELS, ImageError
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch, resize_rgb, to_tensor
from pni_ray.evaluate import evaluate_category, run_modes
from pni_ray.inference import load_detector
from pni_ray.models.coreset import greedy_kcenter_order
from pni_ray.models.features import build_extractor
from pni_ray.models.pni import build_detector
from pni_ray.training import train_category

from conftest import tiny_config

SHAPES = [(200, 320), (320, 200), (97, 250)]
CROP = (24, 0, 80, 128)  # washer 128 x 128 -> 80 high x 128 wide


def smooth_image(h: int, w: int) -> np.ndarray:
    """Bright smooth gradients: resampling barely changes them, black padding would stand out."""
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    rgb = np.stack([120 + 100 * y + 0 * x, 120 + 100 * x + 0 * y, 200 - 60 * x * y], -1)
    return rgb.astype(np.uint8)


def geometry(policy: str = "resize", size: int = 128, **kw) -> Geometry:
    return Geometry(GeometryConfig(policy=policy, **kw), size)


# -- config ------------------------------------------------------------------------------------


def test_defaults_keep_todays_behaviour():
    cfg = TrainConfig()
    assert cfg.geometry == GeometryConfig()
    assert cfg.geometry.policy == "resize" and not cfg.geometry.tile
    assert cfg.geometry.max_pixels == DEFAULT_MAX_PIXELS
    assert cfg.coreset.max_candidates is None
    assert Geometry.from_config(cfg).canvas_hw() == (cfg.features.image_size,) * 2
    again = TrainConfig.from_dict(cfg.replace(geometry=GeometryConfig(policy="letterbox", tile_overlap=32)).to_dict())
    assert again.geometry.policy == "letterbox" and again.geometry.tile_overlap == 32
    old = cfg.to_dict()
    del old["geometry"]  # bundles written before geometry existed load with today's behaviour
    assert TrainConfig.from_dict(old).geometry == GeometryConfig()


def test_cli_flags_build_the_geometry():
    from pni_ray.cli import build_config

    assert build_config().geometry == GeometryConfig()
    cfg = build_config(geometry="short-side", tile=True, tile_size=128, tile_overlap=32, tile_scale=0.5,
                       coreset_candidates=1000)
    assert (cfg.geometry.policy, cfg.geometry.tile, cfg.geometry.tile_size) == ("short-side", True, 128)
    assert (cfg.geometry.tile_overlap, cfg.geometry.tile_scale, cfg.coreset.max_candidates) == (32, 0.5, 1000)


def test_bad_geometry_settings_refused():
    with pytest.raises(ValueError, match="geometry.policy must be one of resize, letterbox, short-side"):
        geometry("stretch")
    with pytest.raises(ValueError, match="tile_overlap"):
        geometry(tile=True, tile_overlap=12)
    with pytest.raises(ValueError, match="tile_overlap"):
        geometry(tile=True, tile_overlap=128)


# -- prepare / restore -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy,kw", [
    ("resize", {}), ("letterbox", {}), ("short-side", {}),
    ("resize", {"tile": True, "tile_size": 64, "tile_overlap": 16}),
    ("resize", {"tile": True, "tile_size": 64, "tile_overlap": 16, "tile_scale": 0.5}),
])
def test_prepare_restore_round_trip(policy, kw, shape):
    h, w = shape
    rgb = smooth_image(h, w)
    geo = geometry(policy, **kw)
    p = geo.prepare(rgb)
    hc, wc = p.canvas_hw
    assert p.original_hw == (h, w) and p.grid == (hc // STRIDE, wc // STRIDE)
    assert hc % STRIDE == 0 and wc % STRIDE == 0
    red = to_float(p.canvas)[0]
    back = geo.restore(red, p)  # the canvas itself as a "map": must come back as the image
    assert back.shape == (h, w) and back.dtype == np.float32
    err = np.abs(back - rgb[..., 0] / np.float32(255.0))
    assert float(err.mean()) < 0.01 and float(err.max()) < 0.1, (policy, kw, shape, float(err.max()))
    if kw.get("tile") and kw.get("tile_scale", 1.0) == 1.0:
        assert np.array_equal(back, red[:h, :w])  # native-resolution tiling: content is the image
    plain = Geometry(geo.cfg, geo.image_size, image_window=0)  # the content maximum, no box average
    assert plain.image_score(red, p) == pytest.approx(float((rgb[..., 0] / 255.0).max()), abs=0.02)
    assert geo.image_score(red, p) <= plain.image_score(red, p) + 1e-6


def test_letterbox_canvas_and_validity():
    geo = geometry("letterbox", pad_value=7)
    p = geo.prepare(smooth_image(200, 320))  # scale 0.4 -> 80 x 128 centred: rows 24..104
    assert p.canvas_hw == (128, 128) and p.content == (24, 0, 104, 128)
    assert bool((p.canvas[:24] == 7).all()) and bool((p.canvas[104:] == 7).all())
    expected = np.zeros((16, 16), bool)
    expected[3:13] = True
    assert np.array_equal(p.valid, expected)
    fill = p.fill_index().reshape(16, 16)  # padded cells take their nearest content cell's score
    assert (fill[:3] == 3 * 16 + np.arange(16)).all() and (fill[13:] == 12 * 16 + np.arange(16)).all()
    assert (fill[3:13] == np.arange(3 * 16, 13 * 16).reshape(10, 16)).all()
    p = geo.prepare(smooth_image(97, 250))  # 50 x 128 at rows 39..89: cells with >= 4 content rows
    rows = np.array([min(8 * i + 8, 89) - max(8 * i, 39) >= 4 for i in range(16)])
    assert np.array_equal(p.valid, np.broadcast_to(rows[:, None], (16, 16)))
    assert geometry("letterbox").prepare(smooth_image(128, 128)).valid is None  # square: nothing padded


def test_short_side_shapes_and_mismatch_error():
    geo = geometry("short-side")
    assert geo.prepare(smooth_image(200, 320)).canvas_hw == (128, 208)  # 320 * 0.64 = 204.8 -> 208
    assert geo.prepare(smooth_image(320, 200)).canvas_hw == (208, 128)
    assert geo.prepare(smooth_image(97, 250)).canvas_hw == (128, 336)
    trained = Geometry(GeometryConfig(policy="short-side"), 128, grid=(16, 26))
    trained.check(trained.prepare(smooth_image(200, 320)))
    trained.check(trained.prepare(smooth_image(400, 640)))  # same aspect, other resolution: same grid
    with pytest.raises(GeometryError, match=r"26x16 feature grid.*trained on a 16x26 grid"):
        trained.check(trained.prepare(smooth_image(320, 200)))


# -- tiling ------------------------------------------------------------------------------------


def test_tile_starts_cover_with_overlap():
    for tile in (64, 128):
        for overlap in (0, 16, 32):
            for length in range(tile, 5 * tile, 8):
                starts = tile_starts(length, tile, overlap)
                assert starts[0] == 0 and starts[-1] == length - tile
                assert all(s % STRIDE == 0 for s in starts)
                gaps = np.diff(starts)
                assert (gaps > 0).all() and (gaps <= tile - overlap).all(), (length, tile, overlap, starts)


def test_stitching_keeps_constants_constant():
    weights = blend_weights(8, 2)
    assert float(weights.min()) > 0 and float(weights.max()) == 1.0
    offsets = [(y, x) for y in (0, 4, 8) for x in (0, 5, 10)]
    feats = np.full((len(offsets), 3, 8, 8), 2.5, np.float32)
    out = stitch(feats, offsets, (16, 18), weights)
    assert out.shape == (3, 16, 18)
    assert np.allclose(out, 2.5, atol=1e-6)


@pytest.mark.parametrize("shape", [(200, 320), (97, 250), (40, 50)])
def test_stitched_features_sit_at_their_whole_image_positions(shape):
    """A position-preserving 'extractor' (8 x 8 average pooling): tiles stitched = the whole canvas pooled."""
    geo = geometry(tile=True, tile_size=64, tile_overlap=16)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    p = geo.prepare(rgb)
    assert len(p.tiles) > 1 or shape == (40, 50)
    stitched = geometry_features(lambda x: F.avg_pool2d(x, STRIDE), geo, [p])[0]
    whole = F.avg_pool2d(torch.from_numpy(to_float(p.canvas))[None], STRIDE)[0]
    assert stitched.shape == whole.shape == (3, *p.grid)
    assert torch.allclose(stitched, whole, atol=1e-5)
    if shape == (40, 50):  # smaller than a tile: padded to 64 x 64, padding cells invalid
        assert p.canvas_hw == (64, 64) and p.valid is not None and not bool(p.valid[6:, :].any())


def test_candidate_rows_cap_and_validity():
    valid = torch.zeros(3, 4, 5, dtype=torch.bool)
    valid[:, 1:3] = True
    idx = candidate_rows(valid, 60, None, 0)
    assert torch.equal(idx, valid.reshape(-1).nonzero(as_tuple=True)[0])
    capped = candidate_rows(valid, 60, 7, 0)
    assert len(capped) == 7 and bool(valid.reshape(-1)[capped].all()) and torch.equal(capped, capped.sort().values)
    assert torch.equal(capped, candidate_rows(valid, 60, 7, 0))  # seeded
    assert candidate_rows(None, 60, None, 0) is None and candidate_rows(torch.ones(2, 2, dtype=torch.bool), 4, None, 0) is None
    assert len(candidate_rows(None, 60, 10, 1)) == 10


# -- pixel limit -------------------------------------------------------------------------------


def test_images_over_the_pixel_limit_are_refused(tmp_path, synthetic_root):
    small = geometry("letterbox", max_pixels=1000)
    with pytest.raises(ImageError, match="exceeds the limit of 1000"):
        small.prepare(np.zeros((40, 40, 3), np.uint8))
    small.prepare(np.zeros((20, 50, 3), np.uint8))
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    with pytest.raises(ImageError, match="exceeds the limit"):
        small.load(path)
    with pytest.raises(ImageError, match="exceeds the limit"):
        geometry(max_pixels=1000).prepare(np.zeros((40, 40, 3), np.uint8))
    cfg = tiny_config(geometry=GeometryConfig(max_pixels=100 * 100))  # synthetic images are 128 x 128
    with pytest.raises(ValueError, match="exceeds the limit of 10000"):
        train_category(synthetic_root, "washer", cfg, progress=False)


# -- trained models on a non-square set ------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_root(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    derive_category(synthetic_root, "washer", root, crop=CROP)
    return root


GEOMETRIES = {
    "letterbox": GeometryConfig(policy="letterbox", pad_value=255),
    "short-side": GeometryConfig(policy="short-side"),
    "tile": GeometryConfig(tile=True, tile_size=64, tile_overlap=16),
}


@pytest.fixture(scope="module")
def trained_geo(crop_root):
    small = dict(neighbourhood=dataclasses.replace(tiny_config().neighbourhood, epochs=2))
    return {name: train_category(crop_root, "washer", tiny_config(geometry=g, **small), progress=False)
            for name, g in GEOMETRIES.items()}


def test_letterbox_padding_never_in_the_coreset_or_prior(trained_geo, crop_root):
    trained = trained_geo["letterbox"]
    cfg = trained.config
    held = set(trained.report["deterministic"]["holdout_images"])
    paths = [p for p in load_category(crop_root, "washer").train if p.name not in held]
    geo = Geometry.from_config(cfg)
    feats, valid = extract_training_features(build_extractor(cfg.features), geo, paths, 8, progress=False)
    assert feats.shape[-2:] == valid.shape[-2:] == trained.grid == (16, 16)
    assert int((~valid).sum()) == len(paths) * 6 * 16  # 80 x 128 -> 3 padded rows of cells above, 3 below
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    flat = valid.reshape(-1)
    exact = "donot_use_mm_for_euclid_dist"  # exact differences, not |x|^2 - 2xc + |c|^2
    d_valid = torch.cdist(trained.memory, rows[flat], compute_mode=exact).min(1).values
    d_pad = torch.cdist(trained.memory, rows[~flat], compute_mode=exact).min(1).values
    scale = float(rows.norm(dim=1).mean())
    assert float(d_valid.max()) < 1e-4 * scale  # every memory row is a feature of a valid position
    assert float(d_pad.min()) > 1e-2 * scale  # and none is a padded one
    # the test can fail: left free to pick, the same greedy search takes padded rows
    order = greedy_kcenter_order(rows, trained.memory.shape[0], 128, 65536, cfg.seed, progress=False)
    assert int((~flat[order]).sum()) > 0
    # position prior: deep-padding positions (farther than `spread` from any valid cell) got no counts
    prior = trained.position_prior
    assert prior.grid == (16, 16)
    pos_rows = (prior.position.long() // 16).unique()
    spread = trained.report["deterministic"]["position_spread"]  # chosen on held-out images
    reach = math.ceil(spread)  # a half step reaches one cell further along the axes
    assert int(pos_rows.min()) >= 3 - reach and int(pos_rows.max()) <= 12 + reach


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_maps_come_back_at_the_original_size(trained_geo, crop_root, name, tmp_path):
    trained = trained_geo[name]
    detector = build_detector(trained)
    cat = load_category(crop_root, "washer")
    paths = [s.path for s in cat.test]
    results = run_modes(detector, paths, ("patchcore", "pni"), batch_size=4, progress=False)
    for res in results.values():
        assert [m.shape for m in res.maps] == [(80, 128)] * len(paths)
        assert np.isfinite(res.scores).all() and len(res.scores) == len(paths)
    metrics = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
    assert 0.5 < metrics["pixel_auroc"] <= 1.0
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:3]]
    maps, scores = predict_images(detector, images)
    assert [m.shape for m in maps] == [(80, 128)] * 3
    assert np.allclose(scores, results["pni"].scores[:3]) and np.allclose(maps[0], results["pni"].maps[0])
    if name == "letterbox":
        # another aspect ratio is refused by name: its padding's edge lies where training saw content (good images of
        # 2:1 on a model of 1.71:1 ones scored above its threshold); the training ratio at another size is scored
        assert trained.content_extent == ((80, 80), (128, 128))
        odd = [np.asarray(Image.fromarray(images[0]).resize(s[::-1])) for s in SHAPES]
        assert predict_images(detector, odd[:1])[0][0].shape == SHAPES[0]  # 200 x 320: the training ratio, 1.6
        for image in odd[1:]:
            with pytest.raises(GeometryError, match=r"fills \d+ x \d+ px of the 128 x 128 letterbox canvas, the training "
                                                    r"images 128 x 80 px \(width x height\)"):
                predict_images(detector, [image])
        assert predict_images(detector, [np.asarray(Image.fromarray(images[0]).resize((256, 160)))])[0][0].shape == (160, 256)
        # evaluate names every image that does not fit before scoring any (it named the first, after the ones before)
        from pni_ray.predict import detector_geometry

        files = []
        for i, image in enumerate(odd):
            files.append(tmp_path / f"odd_{i}.png")
            Image.fromarray(image).save(files[-1])
        with pytest.raises(GeometryError, match=r"2 of 3 images do not fit the model") as err:
            detector_geometry(detector).check_fits(files)
        assert str(files[0]) not in str(err.value) and all(f"- {f}: " in str(err.value) for f in files[1:])
        legacy = build_detector(dataclasses.replace(trained, content_extent=None))  # a bundle from before the record
        assert [m.shape for m in predict_images(legacy, odd)[0]] == SHAPES
    else:  # short-side / tiles: the grid is fixed by training; another aspect is refused by name
        with pytest.raises(GeometryError, match="trained on a"):
            predict_images(detector, [np.ascontiguousarray(images[0].transpose(1, 0, 2))])
    # the bundle records the geometry and a reloaded detector applies it identically
    path = save_bundle(trained, tmp_path / name)
    reloaded, manifest = load_detector(path)
    assert manifest["config"]["geometry"] == dataclasses.asdict(trained.config.geometry)
    again_maps, again_scores = predict_images(reloaded, images)
    assert np.array_equal(again_scores, scores) and all(np.array_equal(a, b) for a, b in zip(again_maps, maps))
    assert load_bundle(path)[0].grid == trained.grid


def test_tiled_model_works_on_the_whole_image_grid(trained_geo):
    trained = trained_geo["tile"]
    assert trained.grid == (10, 16)  # 80 x 128 canvas, not the 8 x 8 grid of one 64 px tile
    assert trained.position_prior.grid == (10, 16)
    facts = trained.report["deterministic"]
    assert facts["grid"] == [10, 16] and facts["n_valid_patches"] == facts["n_patches"]


def test_default_predict_matches_the_plain_detector(trained_tiny, synthetic_root):
    detector = build_detector(trained_tiny)
    assert detector.config is trained_tiny.config and detector.grid == tuple(trained_tiny.grid)
    assert detector_geometry(detector).cfg == GeometryConfig() and detector_geometry(detector).grid == detector.grid
    paths = [s.path for s in load_category(synthetic_root, "washer").test[:3]]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images[1] = np.asarray(Image.fromarray(images[1]).resize((200, 90)))  # any size: squashed, upsampled back
    maps, scores = predict_images(detector, images)
    ref_maps, ref_scores = detector(to_tensor([resize_rgb(o, 128) for o in images]))  # today's path
    assert np.allclose(scores, ref_scores.numpy(), rtol=1e-5)  # box average: float64 (numpy) vs float32 (torch)
    assert all(np.array_equal(m, resize_map(r.numpy(), o.shape[:2])) for m, r, o in zip(maps, ref_maps, images))
    assert maps[1].shape == (90, 200)
    assert torch.equal(load_batch(paths[:1], 128)[0], to_tensor([resize_rgb(images[0], 128)])[0])


@pytest.mark.parametrize("src,dst", [((16, 16), (128, 128)), ((10, 16), (80, 128)), ((128, 128), (200, 90)),
                                     ((7, 5), (31, 64)), ((64, 64), (20, 30))])
def test_the_one_map_resize_is_torch_bilinear(src, dst):
    """resize_map (numpy, used by evaluate, score output and the edge runtime) = torch's bilinear."""
    amap = np.random.default_rng(1).normal(size=src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(amap)[None, None], size=dst, mode="bilinear", align_corners=False)[0, 0]
    out = resize_map(amap, dst)
    assert out.shape == dst and out.dtype == np.float32
    assert np.abs(out - ref.numpy()).max() < 1e-5
    assert resize_map(amap, src) is not None and np.array_equal(resize_map(amap, src), amap)


def test_stored_refiner_samples_keep_the_canvas_up_to_the_features_size():
    from pni_ray.refine_training import stored_hw

    assert stored_hw((320, 320), 320) == (320, 320)  # resize, letterbox: the canvas itself
    assert stored_hw((320, 560), 320) == (320, 560)  # short side: already the features' size
    assert stored_hw((1024, 1536), 320) == (320, 480)  # a tiled canvas: short side down to 320, aspect kept
    assert stored_hw((160, 256), 128) == (128, 205)


@pytest.mark.parametrize("name", [*GEOMETRIES, "tile x2"])
def test_the_refiner_learns_from_the_canvases_it_refines(trained_geo, crop_root, name):
    """The refiner's synthetic samples are prepared by the bundle's geometry and scored by the scoring
    path: a squashed copy of each image used to meet a non-square position prior and fail after the
    whole fit (short side, tiles), or teach the refiner canvases it never sees (letterbox)."""
    import copy

    from pni_ray.refine_training import good_images, make_refiner_data, stored_hw, train_refiner
    from test_refiner import tiny_refiner_config

    if name == "tile x2":  # a canvas larger than the features' image size: samples kept smaller
        small = dict(neighbourhood=dataclasses.replace(tiny_config().neighbourhood, epochs=1))
        geo = dataclasses.replace(GEOMETRIES["tile"], tile_scale=2.0)
        trained = train_category(crop_root, "washer", tiny_config(geometry=geo, **small), progress=False)
    else:
        trained = copy.deepcopy(trained_geo[name])
    trained.config = trained.config.replace(refiner=tiny_refiner_config(n_samples=8, epochs=1))
    geometry = detector_geometry(build_detector(trained))
    paths = good_images(crop_root, "washer")
    canvas = geometry.prepare(geometry.load(paths[0]))
    data = make_refiner_data(trained, paths[:3], 6, seed=0, progress=False)
    hw = stored_hw(canvas.canvas_hw, 128)
    assert tuple(data.images.shape) == (6, *hw, 3) and data.maps.shape == data.masks.shape == (6, *hw)
    assert (hw == canvas.canvas_hw) == (name != "tile x2")
    assert torch.isfinite(data.maps).all() and data.masks.any()
    if name == "letterbox":  # defects only on the image, the padding as scoring pads
        y0, x0, y1, x1 = canvas.content
        assert y0 > 0 and not data.masks[:, :y0].any() and not data.masks[:, y1:].any()
        assert (data.images[:, :y0] == 255).all() and (data.images[:, y1:] == 255).all()
    refined = train_refiner(trained, crop_root, "washer", progress=False)
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    maps, scores = predict_images(build_detector(refined), [image], refine=True)
    assert maps[0].shape == image.shape[:2] and np.isfinite(maps[0]).all() and np.isfinite(scores).all()


def test_an_image_too_thin_for_the_geometry_is_named_before_training_and_in_evaluation(crop_root, trained_geo, tmp_path):
    """A 128 x 3 image leaves no cell of content on a letterbox canvas: training failed after the coreset and the
    MLP when it was held out, and `evaluate` said so without naming it."""
    import shutil

    cfg = trained_geo["letterbox"].config
    root = tmp_path / "data"
    shutil.copytree(crop_root / "washer", root / "washer")
    good = sorted((root / "washer" / "train" / "good").glob("*.png"))
    from pni_ray.training import calibration_split

    held = []
    for seed in (0, 1):  # held out at one seed, in the memory bank at the other
        thin = good[0].parent / f"thin_{seed}.png"
        Image.fromarray(np.full((3, 128, 3), 128, np.uint8)).save(thin)
        held.append(thin in calibration_split(load_category(root, "washer").train, dataclasses.replace(cfg, seed=seed))[1])
        with pytest.raises(GeometryError, match=rf"thin_{seed}.png: a 128x3 image leaves no feature cell of image content"):
            train_category(root, "washer", dataclasses.replace(cfg, seed=seed), progress=False)
        thin.unlink()
    assert sorted(held) == [False, True]
    Image.fromarray(np.full((3, 128, 3), 128, np.uint8)).save(root / "washer" / "test" / "good" / "thin.png")
    with pytest.raises(GeometryError, match=r"thin.png: a 128x3 image leaves no feature cell"):
        evaluate_category(build_detector(trained_geo["letterbox"]), load_category(root, "washer"), modes=("pni",),
                          progress=False)
