"""Tests for the synthetic defect families used to train PNI's refinement network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pni_ray.data.defects import (
    DEFECT_FAMILIES,
    DefectMix,
    cutpaste,
    cutpaste_scar,
    perlin_noise,
    perlin_texture,
    sample_defect,
    strokes,
    write_defect_examples,
)

FAMILIES = sorted(DEFECT_FAMILIES)


def test_the_config_names_every_defect_family_in_order():
    from pni_ray.config import DEFECT_KINDS

    assert tuple(DEFECT_FAMILIES) == DEFECT_KINDS  # the CLI's --kind choices and the refiner's default weights


def _natural(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus sensor-like noise: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack(
        [120 + 80 * np.sin(3 * yy + seed), 60 + 150 * xx, 200 - 120 * yy * xx], axis=-1
    )
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


IMAGES = {
    "gradient": _natural(64, 80, 0),
    "gradient_tall": _natural(90, 48, 1),
    "black": np.zeros((48, 48, 3), np.uint8),
    "white": np.full((40, 56, 3), 255, np.uint8),
    "grey": np.full((48, 48, 3), 128, np.uint8),
}


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_exactly_the_changed_pixels(family: str, image_name: str) -> None:
    image = IMAGES[image_name]
    before = image.copy()
    for seed in range(6):
        out, mask = DEFECT_FAMILIES[family](image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        np.testing.assert_array_equal(mask, np.any(out != image, axis=-1))
        assert mask.any()
    np.testing.assert_array_equal(image, before)  # input left untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_given_seed(family: str) -> None:
    image = IMAGES["gradient"]
    a = DEFECT_FAMILIES[family](image, np.random.default_rng(7))
    b = DEFECT_FAMILIES[family](image, np.random.default_rng(7))
    c = DEFECT_FAMILIES[family](image, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


# CutPaste's area is specified as 2-15% of the image, which caps the spread at
# 7.5x; the other families must span at least an order of magnitude.
MIN_AREA_SPREAD = {"cutpaste": 5.0, "cutpaste_scar": 10.0, "perlin": 10.0, "strokes": 10.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_defect_sizes_vary_widely(family: str) -> None:
    image = _natural(128, 128, 3)
    areas = [DEFECT_FAMILIES[family](image, np.random.default_rng(s))[1].sum() for s in range(40)]
    assert min(areas) > 0
    assert max(areas) / min(areas) >= MIN_AREA_SPREAD[family]


def test_cutpaste_area_and_rectangle() -> None:
    image = _natural(100, 100, 4)
    for s in range(15):
        out, mask = cutpaste(image, np.random.default_rng(s))
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box <= 0.16 * mask.size  # never bigger than the specified 15%
        assert mask.sum() >= 0.5 * box  # mostly-changed rectangle


def test_scar_is_thin_and_rotated() -> None:
    image = _natural(128, 128, 5)
    axis_aligned = 0
    for s in range(15):
        _, mask = cutpaste_scar(image, np.random.default_rng(s))
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert mask.sum() < 0.05 * mask.size
        axis_aligned += mask.sum() >= 0.9 * box
    assert axis_aligned < 10  # most scars are rotated, not boxes


def test_perlin_with_texture_source_and_beta_blend() -> None:
    image = _natural(64, 64, 6)
    texture = np.full((30, 40, 3), (0, 255, 0), np.uint8)
    out, mask = perlin_texture(image, np.random.default_rng(0), texture_source=texture)
    np.testing.assert_array_equal(mask, np.any(out != image, axis=-1))
    # blending towards pure green: green never decreases, red never increases
    assert (out[mask][:, 1].astype(int) >= image[mask][:, 1]).all()
    assert (out[mask][:, 0].astype(int) <= image[mask][:, 0]).all()
    grey_texture = np.full((20, 20), 10, np.uint8)  # 2-D sources are accepted
    assert perlin_texture(image, np.random.default_rng(1), grey_texture)[1].any()
    with pytest.raises(ValueError):
        perlin_texture(image, np.random.default_rng(1), texture.astype(np.float32))


def test_perlin_noise_properties() -> None:
    rng = np.random.default_rng(0)
    n = perlin_noise((50, 70), (3, 5), rng)
    assert n.shape == (50, 70) and np.isfinite(n).all()
    assert np.abs(n).max() <= 1.5 and n.std() > 0.05
    # smooth: neighbouring pixels differ far less than the value range
    assert np.abs(np.diff(n, axis=1)).mean() < 0.1 * (n.max() - n.min())


def test_strokes_are_few_connected_curves() -> None:
    from scipy import ndimage

    image = _natural(96, 96, 7)
    for s in range(10):
        _, mask = strokes(image, np.random.default_rng(s))
        # thin lines are 8-connected; at most 4 strokes, each one piece
        assert 1 <= ndimage.label(mask, structure=np.ones((3, 3)))[1] <= 4


def test_invalid_image_rejected() -> None:
    rng = np.random.default_rng(0)
    bad_images = (
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 4), np.uint8),
    )
    for bad in bad_images:
        for fn in DEFECT_FAMILIES.values():
            with pytest.raises(ValueError):
                fn(bad, rng)


def test_sample_defect_honours_weights() -> None:
    image = _natural(48, 48, 8)
    rng = np.random.default_rng(0)
    mix = DefectMix(weights={"cutpaste": 1, "cutpaste_scar": 0, "perlin": 2, "strokes": 1})
    names = []
    for _ in range(40):
        out, mask, name = sample_defect(image, rng, mix)
        np.testing.assert_array_equal(mask, np.any(out != image, axis=-1))
        assert mask.any()
        names.append(name)
    assert "cutpaste_scar" not in names
    assert {"cutpaste", "perlin", "strokes"} <= set(names)
    only = DefectMix(weights={"strokes": 3})
    assert {sample_defect(image, rng, only)[2] for _ in range(5)} == {"strokes"}


def test_sample_defect_normal_and_determinism() -> None:
    image = _natural(48, 48, 9)
    out, mask, name = sample_defect(image, np.random.default_rng(0), DefectMix(p_normal=1.0))
    assert name == "normal" and not mask.any()
    np.testing.assert_array_equal(out, image)
    a = sample_defect(image, np.random.default_rng(3))
    b = sample_defect(image, np.random.default_rng(3))
    assert a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    rng = np.random.default_rng(1)
    half = [sample_defect(image, rng, DefectMix(p_normal=0.5))[2] for _ in range(30)]
    assert 0 < half.count("normal") < 30


@pytest.mark.parametrize(
    ("weights", "p_normal", "match"),
    [
        ({"cutpaste": 1, "scratch": 1}, 0.0, "scratch"),
        ({"cutpaste": 0, "strokes": 0}, 0.0, "positive"),
        ({}, 0.0, "positive"),
        ({"cutpaste": -1, "strokes": 2}, 0.0, "cutpaste"),
        ({"cutpaste": 1}, 1.5, "p_normal"),
    ],
)
def test_defect_mix_validation(weights: dict[str, float], p_normal: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DefectMix(weights=weights, p_normal=p_normal)


def _write_images(d: Path) -> None:
    d.mkdir()
    Image.fromarray(_natural(40, 50, 10)).save(d / "b.png")
    Image.fromarray(_natural(36, 36, 11)[..., 0]).save(d / "a.bmp")  # greyscale
    rgba = np.dstack([_natural(30, 40, 12), np.full((30, 40), 200, np.uint8)])
    Image.fromarray(rgba).save(d / "c.png")
    (d / "notes.txt").write_text("not an image")


def test_write_defect_examples(tmp_path: Path) -> None:
    src, out = tmp_path / "imgs", tmp_path / "out"
    _write_images(src)
    paths = write_defect_examples(src, out, n_per_kind=4, seed=1)
    assert paths[-1] == out / "overview.png" and (out / "overview.png").is_file()
    assert len(paths) == 2 * 4 * len(DEFECT_FAMILIES) + 1
    assert all(p.is_file() for p in paths)
    # examples cycle through the sorted images: a, b, c, a
    assert (out / "strokes" / "a_0.png").is_file() and (out / "strokes" / "a_3_mask.png").is_file()
    assert (out / "perlin" / "c_2.png").is_file()
    img = np.asarray(Image.open(out / "cutpaste" / "b_1.png"))
    mask = np.asarray(Image.open(out / "cutpaste" / "b_1_mask.png"))
    assert img.shape == (40, 50, 3) and mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    assert mask.any()
    overview = Image.open(out / "overview.png")
    assert overview.mode == "RGB" and overview.width > overview.height > 100  # 4 rows x 4 columns
    # deterministic and restricted to the requested kinds
    again = write_defect_examples(src, tmp_path / "again", kinds=["cutpaste"], n_per_kind=2, seed=1)
    assert len(again) == 2 * 2 + 1
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "again" / "cutpaste" / "b_1.png")), img
    )
    assert not (tmp_path / "again" / "strokes").exists()


def test_write_defect_examples_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        write_defect_examples(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        write_defect_examples(empty, tmp_path / "out")
    src = tmp_path / "imgs"
    _write_images(src)
    with pytest.raises(ValueError, match="scratch"):
        write_defect_examples(src, tmp_path / "out", kinds=["cutpaste", "scratch"])


def test_defect_examples_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """A bad image leaves no half-written OUT; a rerun replaces the last examples whole (no stale kinds);
    a folder of anything else is refused; WebP, which training reads, is read here too."""
    from pni_ray.data.images import ImageError

    src, out = tmp_path / "imgs", tmp_path / "out"
    _write_images(src)
    Image.fromarray(_natural(30, 30, 13)).save(src / "d.webp")
    (src / "e.png").write_bytes(b"not a png")  # sorted last: reached after a, b, c, d were written
    with pytest.raises(ImageError, match="e.png"):
        write_defect_examples(src, out, kinds=["perlin"], n_per_kind=5)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    (src / "e.png").unlink()
    first = write_defect_examples(src, out, kinds=["perlin"], n_per_kind=4)
    assert (out / "perlin" / "d_3.png") in first and (out / "perlin" / "d_3.png").is_file()  # the WebP
    write_defect_examples(src, out, kinds=["strokes", "strokes"], n_per_kind=1)  # a kind given twice: once
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "overview.png", "strokes"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="holds 1 file"):
        write_defect_examples(src, mine, kinds=["strokes"], n_per_kind=1)
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
