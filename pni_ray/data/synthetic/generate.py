"""Deterministic synthetic categories in the MVTec AD directory layout: the registry, `render` and the writer.

Why: the demo and most tests need small anomaly-detection datasets with exact
ground truth that regenerate byte-for-byte, without downloading MVTec AD.
Four kinds cover the regimes PNI is meant to handle:

* ``weave``   - periodic texture (regular woven pattern),
* ``granite`` - stochastic texture (filtered noise with grains),
* ``washer``  - a centred object with a fixed pose,
* ``pillbox`` - a tray of white and black tablets in a fixed 5 x 5 layout
  whose defects are purely logical: a defective compartment, with its
  surroundings, looks like a compartment of some good image; only *where*
  that content is (wrong type, no tablet, a tablet too many) is wrong.

Layout written per category (MVTec AD conventions)::

    OUT/<cat>/train/good/000.png ...
    OUT/<cat>/test/good/000.png ...
    OUT/<cat>/test/<defect>/000.png ...
    OUT/<cat>/ground_truth/<defect>/000_mask.png   (mode L, 0/255)

Ground truth is exact: each defective image is rendered twice from the same
random state, once without and once with the defect, and the mask is the set
of pixels that differ (for ``pillbox`` it is the footprint of the tablets that
vanished, appeared or changed type, which equals the changed pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from pni_ray.data.synthetic.pillbox import pillbox_draw, pillbox_scene
from pni_ray.data.synthetic.textures import granite_draw, granite_scene, weave_draw, weave_scene
from pni_ray.data.synthetic.washer import washer_draw, washer_scene

__all__ = [
    "CATEGORIES",
    "DEFECT_TYPES",
    "SyntheticSpec",
    "image_seed",
    "make_synthetic",
    "render",
]

CATEGORIES: tuple[str, ...] = ("weave", "granite", "washer", "pillbox")

DEFECT_TYPES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "weave": ("scratch", "hole", "color"),
        "granite": ("crack", "stain"),
        "washer": ("crack", "missing_piece", "contamination"),
        "pillbox": ("missing", "misplaced", "extra"),
    }
)

MIN_SIZE = 32
SYNTHETIC_SIZE = 256  # px, what make_synthetic draws by default (the demo trains at it)
_MAX_DEFECT_TRIES = 16

Seed = Union[int, Sequence[int]]
# Each category is a pair: a scene function draws everything about the
# defect-free image from ``rng``; a draw function renders that scene, adding a
# defect drawn from its own generator.  Both renders share one scene, so the
# good and defective images differ exactly where the defect is.
SceneFn = Callable[[np.random.Generator, int], Any]
DrawFn = Callable[
    [Any, Optional[str], Optional[np.random.Generator]], tuple[np.ndarray, Optional[np.ndarray]]
]


@dataclass(frozen=True)
class SyntheticSpec:
    """Image size and per-split counts; defaults keep a category under ~1 s."""

    size: int = SYNTHETIC_SIZE
    n_train: int = 32
    n_test_good: int = 8
    n_test_defect_per_type: int = 4

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < MIN_SIZE:
            raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {self.size!r}")
        for name in ("n_train", "n_test_good", "n_test_defect_per_type"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _plain(
    draw: Callable[[Any, Optional[str], Optional[np.random.Generator]], np.ndarray],
) -> DrawFn:
    """Adapt a draw function without an explicit mask to the common signature."""

    def wrapped(
        scene: Any, defect: Optional[str], drng: Optional[np.random.Generator]
    ) -> tuple[np.ndarray, None]:
        return draw(scene, defect, drng), None

    return wrapped


_CATEGORY_FNS: Mapping[str, tuple[SceneFn, DrawFn]] = MappingProxyType(
    {
        "weave": (weave_scene, _plain(weave_draw)),
        "granite": (granite_scene, _plain(granite_draw)),
        "washer": (washer_scene, _plain(washer_draw)),
        "pillbox": (pillbox_scene, pillbox_draw),
    }
)


def _check_category(category: str) -> None:
    if category not in _CATEGORY_FNS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def image_seed(seed: int, category: str, split: str, index: int) -> tuple[int, int, int, int]:
    """Seed for one image: ``(seed, category index, split code, index)``.

    Why: keying on the global category index (not the position in a subset)
    makes a subset of categories produce the very same images.  ``split`` is
    ``"train"``, ``"good"`` (test/good) or one of the category's defect types.
    """
    _check_category(category)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index!r}")
    if split == "train":
        code = 0
    elif split == "good":
        code = 1
    elif split in DEFECT_TYPES[category]:
        code = 2 + DEFECT_TYPES[category].index(split)
    else:
        raise ValueError(f"unknown split {split!r} for category {category!r}")
    return (int(seed), CATEGORIES.index(category), code, int(index))


def render(
    category: str,
    seed: Seed,
    defect: Optional[str] = None,
    size: int = SYNTHETIC_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its exact defect mask.

    Returns ``(image, mask)``: ``image`` is uint8 (size, size, 3), ``mask`` is
    bool (size, size).  ``render(c, s)`` is the defect-free version of
    ``render(c, s, defect)``: both consume the same scene random state and the
    defect draws from a separate stream, so the mask is exactly the changed
    pixels (pillbox: the footprint of removed/added/swapped tablets, which is the same).
    """
    _check_category(category)
    if defect is not None and defect not in DEFECT_TYPES[category]:
        raise ValueError(f"unknown defect {defect!r} for {category!r}: {DEFECT_TYPES[category]}")
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    size = int(size)
    scene_ss, defect_ss = np.random.SeedSequence(seed).spawn(2)
    scene_fn, draw_fn = _CATEGORY_FNS[category]
    scene = scene_fn(np.random.default_rng(scene_ss), size)
    good, _ = draw_fn(scene, None, None)
    if defect is None:
        return good, np.zeros((size, size), dtype=bool)
    drng = np.random.default_rng(defect_ss)
    min_area = max(8, size * size // 1000)
    for _ in range(_MAX_DEFECT_TRIES):
        bad, footprint = draw_fn(scene, defect, drng)
        mask = (bad != good).any(axis=2) if footprint is None else footprint
        if int(mask.sum()) >= min_area:
            return bad, mask
    raise RuntimeError(f"could not place a visible {defect!r} defect for seed {seed!r}")


def _write_png(path: Path, array: np.ndarray, mode: str) -> None:
    """Write atomically (temp file + os.replace) so readers never see half a PNG.

    RGB images are stored uncompressed: their sensor noise barely compresses
    (about 30 %) and zlib would double the generation time.  Masks compress well.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img = Image.fromarray(array)
        if img.mode != mode:
            raise ValueError(f"expected a {mode} array, got {img.mode}")
        img.save(tmp, format="PNG", compress_level=0 if mode == "RGB" else 6)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _resolve_spec(size: int, spec: Optional[SyntheticSpec]) -> SyntheticSpec:
    """``spec`` gives counts and size; an explicit ``size`` must not contradict it."""
    if spec is None:
        return SyntheticSpec(size=size)
    if size != SYNTHETIC_SIZE and size != spec.size:
        raise ValueError(f"size={size} conflicts with spec.size={spec.size}")
    return spec


def make_synthetic(
    out: Path,
    seed: int = 0,
    size: int = SYNTHETIC_SIZE,
    categories: Optional[Sequence[str]] = None,
    spec: Optional[SyntheticSpec] = None,
) -> list[Path]:
    """Write synthetic categories under ``out`` in MVTec AD layout; return their dirs.

    Deterministic: the same seed and spec give byte-identical files, whatever
    subset of categories is asked for.  An existing category directory is
    overwritten; stale PNGs left in its train/test/ground_truth trees by an
    earlier, larger run are removed so the result equals a fresh generation.
    When ``spec`` is given it sets the size; ``size`` may then be left at its
    default or must equal ``spec.size``.
    """
    spec = _resolve_spec(size, spec)
    cats = CATEGORIES if categories is None else tuple(categories)
    for cat in cats:
        _check_category(cat)
    if len(set(cats)) != len(cats):
        raise ValueError(f"duplicate categories in {cats}")
    image_seed(seed, cats[0] if cats else CATEGORIES[0], "train", 0)  # validates seed

    out = Path(out)
    dirs: list[Path] = []
    for cat in cats:
        cat_dir = out / cat
        jobs: list[tuple[str, Optional[str], int]] = [
            ("train", None, spec.n_train),
            ("good", None, spec.n_test_good),
        ]
        jobs += [(d, d, spec.n_test_defect_per_type) for d in DEFECT_TYPES[cat]]
        written: set[Path] = set()
        for split, defect, count in jobs:
            img_dir = cat_dir / "train" / "good" if split == "train" else cat_dir / "test" / split
            for i in range(count):
                stem = f"{i:03d}"
                image, mask = render(cat, image_seed(seed, cat, split, i), defect, spec.size)
                img_path = img_dir / f"{stem}.png"
                _write_png(img_path, image, "RGB")
                written.add(img_path)
                if defect is not None:
                    mask_path = cat_dir / "ground_truth" / defect / f"{stem}_mask.png"
                    _write_png(mask_path, mask.astype(np.uint8) * 255, "L")
                    written.add(mask_path)
            img_dir.mkdir(parents=True, exist_ok=True)  # also when count == 0
            if defect is not None:
                (cat_dir / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for sub in ("train", "test", "ground_truth"):
            tree = cat_dir / sub
            if tree.is_dir():
                for stale in sorted(tree.rglob("*.png")):
                    if stale not in written:
                        stale.unlink()
        dirs.append(cat_dir)
    return dirs
