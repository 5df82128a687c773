"""Tests for the synthetic MVTec-AD-style generator (pni_ray.data.synthetic).

Why: most other tests and the demo stand on this data, so its layout,
determinism and the exactness of its masks are checked here once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pni_ray.data.synthetic import (
    CATEGORIES,
    DEFECT_TYPES,
    SyntheticSpec,
    image_seed,
    make_synthetic,
    render,
)

SIZE = 64
SPEC = SyntheticSpec(size=SIZE, n_train=3, n_test_good=2, n_test_defect_per_type=2)


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_a")
    dirs = make_synthetic(out, seed=0, spec=SPEC)
    assert dirs == [out / c for c in CATEGORIES]
    return out


def _defect_items(root: Path, category: str) -> list[tuple[str, int, Path, Path]]:
    """(defect, index, image path, mask path) for every defective test image."""
    items = []
    for defect in DEFECT_TYPES[category]:
        for i in range(SPEC.n_test_defect_per_type):
            img = root / category / "test" / defect / f"{i:03d}.png"
            mask = root / category / "ground_truth" / defect / f"{i:03d}_mask.png"
            items.append((defect, i, img, mask))
    return items


def test_categories_and_defect_types() -> None:
    assert CATEGORIES == ("weave", "granite", "washer", "pillbox")
    assert set(DEFECT_TYPES) == set(CATEGORIES)
    assert DEFECT_TYPES["pillbox"] == ("missing", "misplaced", "extra")


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path, seed=0, spec=SPEC)
    assert _files(tmp_path) == _files(dataset)


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path, seed=1, spec=SPEC, categories=["weave", "pillbox"])
    other, ref = _files(tmp_path), _files(dataset)
    for cat in ("weave", "pillbox"):
        key = f"{cat}/train/good/000.png"
        assert other[key] != ref[key]


def test_layout_counts_and_masks(dataset: Path) -> None:
    for cat in CATEGORIES:
        root = dataset / cat
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
            f"{i:03d}.png" for i in range(SPEC.n_train)
        ]
        assert len(list((root / "test" / "good").glob("*.png"))) == SPEC.n_test_good
        defects = DEFECT_TYPES[cat]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(("good",) + defects)
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(defects)
        assert not (root / "ground_truth" / "good").exists()
        n_def = SPEC.n_test_defect_per_type
        for defect in defects:
            assert len(list((root / "test" / defect).glob("*.png"))) == n_def
            assert len(list((root / "ground_truth" / defect).glob("*.png"))) == n_def
        for path in list((root / "train").rglob("*.png")) + list((root / "test").rglob("*.png")):
            with Image.open(path) as im:
                assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        for _, _, img_path, mask_path in _defect_items(dataset, cat):
            with Image.open(mask_path) as im:
                assert im.mode == "L" and im.size == (SIZE, SIZE)
            mask = _load(mask_path)
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).sum() > 0
        # No stray temp files from the atomic writes.
        assert not [p for p in root.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("category", CATEGORIES)
def test_mask_equals_changed_pixels(dataset: Path, category: str) -> None:
    """The saved mask is exactly where the saved image differs from its good rendering."""
    for defect, i, img_path, mask_path in _defect_items(dataset, category):
        seed = image_seed(0, category, defect, i)
        image, mask = _load(img_path), _load(mask_path) > 0
        good, good_mask = render(category, seed, None, SIZE)
        bad, bad_mask = render(category, seed, defect, SIZE)
        assert not good_mask.any()
        assert np.array_equal(bad, image) and np.array_equal(bad_mask, mask)
        changed = (image != good).any(axis=2)
        assert np.array_equal(changed, mask), (category, defect, i)


def test_good_images_match_render(dataset: Path) -> None:
    for cat in CATEGORIES:
        img = _load(dataset / cat / "test" / "good" / "001.png")
        assert np.array_equal(img, render(cat, image_seed(0, cat, "good", 1), None, SIZE)[0])


def test_images_vary_between_samples(dataset: Path) -> None:
    """Per-image noise and jitter: no two good images are identical."""
    for cat in CATEGORIES:
        a = _load(dataset / cat / "train" / "good" / "000.png").astype(int)
        b = _load(dataset / cat / "train" / "good" / "001.png").astype(int)
        assert np.abs(a - b).mean() > 1.0


def _centre(sl: tuple[slice, slice]) -> tuple[int, int]:
    return ((sl[0].start + sl[0].stop - 1) // 2, (sl[1].start + sl[1].stop - 1) // 2)


PILL_GRID = 5  # compartments per side of the pillbox tray


def _compartments(size: int) -> list[tuple[int, int]]:
    """Nominal compartment centres, row-major (the rendering jitters them by a pixel or two)."""
    pitch = size / PILL_GRID
    return [
        (int(round((i + 0.5) * pitch - 0.5)), int(round((j + 0.5) * pitch - 0.5)))
        for i in range(PILL_GRID)
        for j in range(PILL_GRID)
    ]


def _content(image: np.ndarray, centre: tuple[int, int], size: int) -> str:
    """What a compartment holds, from the mean colour of its centre: white / black tablet or tray."""
    r = max(1, int(0.03 * size))
    y, x = centre
    mean = image[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).astype(float).mean(0)
    if mean.min() > 140:
        return "A"
    if mean.max() < 90:
        return "B"
    assert mean[2] > mean[0] + 40, mean  # blue tray
    return "E"


def _window_diff(
    a: np.ndarray, ca: tuple[int, int], b: np.ndarray, cb: tuple[int, int], h: int, reach: int = 2
) -> float:
    """Smallest mean |a - b| of two (2h+1)^2 windows, allowing a misregistration of +-reach px."""
    wa = a[ca[0] - h : ca[0] + h + 1, ca[1] - h : ca[1] + h + 1].astype(float)
    best = np.inf
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            y, x = cb[0] + dy, cb[1] + dx
            wb = b[y - h : y + h + 1, x - h : x + h + 1].astype(float)
            if wb.shape == wa.shape:
                best = min(best, float(np.abs(wa - wb).mean()))
    return best


def test_pillbox_defects_are_purely_logical() -> None:
    """A defect puts in a fixed compartment what other compartments hold.

    Good images always hold the same content in the compartments a defect
    touches; the defective content (a tablet of the other type, no tablet, a
    tablet where there never is one) looks exactly like another compartment of
    the same image (noise only).  Local appearance carries no defect evidence:
    only where the content is, is wrong.
    """
    size = 128
    slots = _compartments(size)
    half = int(np.ceil(0.065 * size)) + 2
    inner = {
        i * PILL_GRID + j for i in range(1, PILL_GRID - 1) for j in range(1, PILL_GRID - 1)
    }
    goods = [render("pillbox", image_seed(7, "pillbox", "train", i), None, size)[0] for i in range(16)]
    layouts = [[_content(g, c, size) for c in slots] for g in goods]
    fixed = {k for k in range(len(slots)) if len({lay[k] for lay in layouts}) == 1}
    assert len(fixed) < len(slots)  # some compartments vary between good images
    for defect in DEFECT_TYPES["pillbox"]:
        for i in range(3):
            seed = image_seed(3, "pillbox", defect, i)
            good, _ = render("pillbox", seed, None, size)
            bad, mask = render("pillbox", seed, defect, size)
            assert np.array_equal((bad != good).any(axis=2), mask)
            labels, n = ndimage.label(mask)
            assert n == {"missing": 1, "misplaced": 2, "extra": 1}[defect]
            before = [_content(good, c, size) for c in slots]
            after = [_content(bad, c, size) for c in slots]
            touched = [k for k in range(len(slots)) if before[k] != after[k]]
            assert len(touched) == n
            kinds = {
                "missing": {("A", "E"), ("B", "E")},
                "extra": {("E", "A"), ("E", "B")},
                "misplaced": {("A", "B"), ("B", "A")},
            }[defect]
            for k in touched:
                # Only fixed inner compartments are touched, and with content their good
                # images never hold there.
                assert k in inner and k in fixed, (defect, i, k)
                assert (layouts[0][k], after[k]) in kinds
                assert before[k] == layouts[0][k]
                # The footprint is the tablet's disc at that compartment.
                comp = labels[slots[k]]
                assert comp > 0
                cy, cx = _centre(ndimage.find_objects(labels)[comp - 1])
                assert abs(cy - slots[k][0]) <= 2 and abs(cx - slots[k][1]) <= 2
                # What is there now looks like another compartment of the same image.
                others = [c for j, c in enumerate(slots) if j != k and after[j] == after[k]]
                assert others and min(_window_diff(bad, slots[k], bad, c, half) for c in others) < 6.0


def test_sizes_honoured(tmp_path: Path) -> None:
    spec = SyntheticSpec(size=48, n_train=1, n_test_good=1, n_test_defect_per_type=1)
    make_synthetic(tmp_path / "a", spec=spec, categories=["washer"])
    for path in (tmp_path / "a").rglob("*.png"):
        with Image.open(path) as im:
            assert im.size == (48, 48)
    for cat in CATEGORIES:
        image, mask = render(cat, 5, DEFECT_TYPES[cat][0], 40)
        assert image.shape == (40, 40, 3) and image.dtype == np.uint8
        assert mask.shape == (40, 40) and mask.dtype == bool and mask.any()
    with pytest.raises(ValueError):
        make_synthetic(tmp_path / "c", size=96, spec=spec)
    with pytest.raises(ValueError):
        SyntheticSpec(size=8)


def test_size_argument_without_spec(tmp_path: Path) -> None:
    (cat_dir,) = make_synthetic(tmp_path, size=40, categories=["pillbox"])
    default = SyntheticSpec()
    assert len(list((cat_dir / "train" / "good").glob("*.png"))) == default.n_train
    with Image.open(cat_dir / "train" / "good" / "000.png") as im:
        assert im.size == (40, 40)


def test_category_subset_gives_same_images(dataset: Path, tmp_path: Path) -> None:
    dirs = make_synthetic(tmp_path, seed=0, spec=SPEC, categories=["pillbox", "granite"])
    assert dirs == [tmp_path / "pillbox", tmp_path / "granite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["granite", "pillbox"]
    ref = _files(dataset)
    for key, data in _files(tmp_path).items():
        assert ref[key] == data, key


def test_overwrite_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    big = SyntheticSpec(size=SIZE, n_train=5, n_test_good=3, n_test_defect_per_type=3)
    make_synthetic(tmp_path, seed=4, spec=big, categories=["weave"])
    make_synthetic(tmp_path, seed=0, spec=SPEC, categories=["weave"])
    ref = {k: v for k, v in _files(dataset).items() if k.startswith("weave/")}
    assert _files(tmp_path) == ref


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, spec=SPEC, categories=["bottle"])
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, seed=-1, spec=SPEC)
    with pytest.raises(ValueError):
        render("weave", 0, "missing", SIZE)
    with pytest.raises(ValueError):
        image_seed(0, "weave", "crack", 0)
