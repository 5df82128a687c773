"""Image geometry, torch-free: images of any shape -> model-input canvases -> maps at each image's own size.

One `Geometry` (from `GeometryConfig`, the model image size S and the trained feature grid) is used
by training, calibration, `evaluate`, batch scoring (torch bundles and exports) and the torch-free
edge runtime alike, so every path sees the same pixels and restores maps with the same resize:

* ``resize``     squash to S x S.
* ``letterbox``  keep the aspect ratio, scale the long side to S, centre on an S x S canvas of grey
  ``pad_value``. Feature-grid cells (stride 8) that are mostly padding are *invalid*: training
  leaves them out of the coreset, the prior and the MLP loss; their patch scores are replaced by
  the nearest valid cell's before the map is made; maps are cropped to the content before they are
  resized to the original size, and the image score is the maximum over the content only. The
  padding's edge still shapes the features near it, so an image filling more or less of the canvas
  than the training images did (another aspect ratio) is refused by name (`check_layout`).
* ``short-side`` keep the aspect ratio, scale the short side to S and the long side to the nearest
  multiple of 16; the feature grid has that shape and the prior is indexed on it. An image whose
  grid differs from the training grid (another aspect ratio) is refused naming both shapes.
* ``tile``       (any policy; the policy is then not used) the image is scaled by ``tile_scale``,
  padded (invalid cells) to at least one tile and to a multiple of 8, and covered with overlapping
  tiles of ``tile_size`` starting on the stride-8 grid. Tile features are stitched into one
  whole-image grid with linear weights falling off over the overlap (`stitch`), so coreset, MLP,
  prior and scoring all run on the whole-image grid. The weights also hide each tile's own border
  (its edge cells are pooled as the image's border is) wherever a neighbouring tile overlaps it.

This module needs numpy and PIL only (never torch): the edge runtime imports it. Everything a
deployment needs to reproduce a prepared image travels as (canvas, original size, content box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pni_ray.config import LEGACY_SCORING, GeometryConfig, ScoringConfig
from pni_ray.data.images import TOO_BIG_HINT, ImageError, image_size, load_rgb, resize_rgb, to_float

STRIDE = 8  # feature stride of PatchFeatureExtractor (pni_ray.models.features.FEATURE_STRIDE)
# letterbox: how far (canvas pixels) an image's content height or width may lie outside the training images'
# range. The padding's edge is part of every feature near it (receptive fields span the canvas), so an edge
# where training saw content scores as a defect: good 2:1 images on a model of 1.71:1 ones (5.5 px per side on a
# 128 px canvas) scored above the threshold, 7 of 8. Half a cell covers the rounding of sizes alike.
EXTENT_SLACK = STRIDE // 2


class GeometryError(ValueError):
    """An image whose geometry does not fit the trained model (e.g. another aspect ratio)."""


# -- the one map resize ----------------------------------------------------------------------------


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weight of i1 for each output index: torch's bilinear, align_corners=False."""
    scale = np.float32(n_in) / np.float32(n_out)  # float32 index arithmetic, as torch does for float maps
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) float32, bilinear (align_corners=False, no antialias).

    The single resize that brings every anomaly map back to its image's size: `evaluate`, the
    Parquet maps of `pni-ray score` (bundles and exports) and the edge runtime all call it, so the
    maps that were evaluated are the maps that are deployed.
    """
    amap = np.asarray(amap, dtype=np.float32)
    h, w = int(hw[0]), int(hw[1])
    if amap.shape == (h, w):
        return amap
    y0, y1, wy = bilinear_taps(amap.shape[0], h)
    x0, x1, wx = bilinear_taps(amap.shape[1], w)
    rows = amap[y0] * (np.float32(1) - wy)[:, None] + amap[y1] * wy[:, None]
    return np.ascontiguousarray(rows[:, x0] * (np.float32(1) - wx) + rows[:, x1] * wx, dtype=np.float32)


def restore_map(canvas_map: np.ndarray, content: Sequence[int], original_hw: Sequence[int]) -> np.ndarray:
    """A canvas map -> (H, W) float32 over the original image: the content box cropped, then `resize_map`."""
    y0, x0, y1, x1 = (int(c) for c in content)
    return resize_map(np.asarray(canvas_map, np.float32)[y0:y1, x0:x1], (int(original_hw[0]), int(original_hw[1])))


# -- grid helpers ----------------------------------------------------------------------------------


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def grid_of(canvas_hw: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(canvas_hw[0] / STRIDE), math.ceil(canvas_hw[1] / STRIDE)


def _cover(lo: int, hi: int, n: int) -> np.ndarray:
    starts = np.arange(n, dtype=np.float64) * STRIDE
    return np.clip(np.minimum(starts + STRIDE, hi) - np.maximum(starts, lo), 0, None) / STRIDE


def cell_validity(content: tuple[int, int, int, int], canvas_hw: tuple[int, int], min_fraction: float = 0.5) -> np.ndarray | None:
    """(gh, gw) bool: cells whose area is at least `min_fraction` image content; None if all are."""
    y0, x0, y1, x1 = content
    gh, gw = grid_of(canvas_hw)
    rows = _cover(y0, y1, gh) >= min_fraction
    cols = _cover(x0, x1, gw) >= min_fraction
    valid = rows[:, None] & cols[None, :]
    return None if bool(valid.all()) else valid


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts (multiples of 8) covering [0, length) with at least `overlap` px between tiles.

    `length` and `tile` are multiples of 8. The fewest tiles that respect the overlap are used and
    spread evenly; the last tile ends exactly at `length`.
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    span = (length - tile) // STRIDE
    return [int(round(i * span / (n - 1))) * STRIDE for i in range(n)]


def blend_weights(tile_cells: int, overlap_cells: int) -> np.ndarray:
    """(t, t) float32 linear ramp weights: 1 inside, falling to ~0 at the tile edges over the overlap."""
    i = np.arange(tile_cells, dtype=np.float32)
    if overlap_cells <= 0:
        ramp = np.ones(tile_cells, np.float32)
    else:
        ramp = np.minimum((i + 0.5) / overlap_cells, (tile_cells - i - 0.5) / overlap_cells).clip(max=1.0)
    return (ramp[:, None] * ramp[None, :]).astype(np.float32)


def stitch(tile_features: np.ndarray, offsets: Sequence[tuple[int, int]], grid: tuple[int, int], weights: np.ndarray) -> np.ndarray:
    """Tile feature grids (n, D, t, t) at cell offsets -> whole-image grid (D, gh, gw), weighted mean.

    Used by the torch pipeline and the edge runtime alike (one stitching, float32 throughout).
    """
    tile_features = np.asarray(tile_features, np.float32)
    n, d, th, tw = tile_features.shape
    if (th, tw) != weights.shape:
        raise ValueError(f"tile features {(th, tw)} != tile grid {weights.shape}")
    acc = np.zeros((d, *grid), np.float32)
    total = np.zeros(grid, np.float32)
    for f, (oy, ox) in zip(tile_features, offsets):
        acc[:, oy : oy + th, ox : ox + tw] += f * weights
        total[oy : oy + th, ox : ox + tw] += weights
    if bool((total <= 0).any()):
        raise AssertionError("tiles do not cover the whole grid")  # tile_starts guarantees coverage
    return acc / total


# -- one prepared image ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One image made ready for the model, and what is needed to map results back to it."""

    canvas: np.ndarray  # (Hc, Wc, 3) uint8: the model-input canvas
    original_hw: tuple[int, int]  # (H, W) of the image as given
    content: tuple[int, int, int, int]  # (y0, x0, y1, x1): the image's region in canvas pixels
    tiles: tuple[tuple[int, int], ...] = ()  # (y, x) canvas offsets of tiles; () when not tiled
    _valid: Any = field(default=False, repr=False)

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return int(self.canvas.shape[0]), int(self.canvas.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.canvas_hw)

    @property
    def valid(self) -> np.ndarray | None:
        """(gh, gw) bool on the stride-8 grid, None when every cell is image content."""
        if self._valid is False:
            self._valid = cell_validity(self.content, self.canvas_hw)
        return self._valid

    def valid_grid(self) -> np.ndarray:
        return self.valid if self.valid is not None else np.ones(self.grid, bool)

    def fill_index(self) -> np.ndarray:
        """(gh * gw,) int64 flat index of each cell's nearest valid cell (itself when valid).

        Valid cells form a rectangle (a product of two intervals), so the nearest valid cell of any
        cell is its coordinates clamped into that rectangle.
        """
        gh, gw = self.grid
        valid = self.valid_grid()
        rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
        if len(rows) == 0:
            raise GeometryError(no_content_message(self.original_hw, self.canvas_hw))
        iy = np.clip(np.arange(gh), rows[0], rows[-1])
        ix = np.clip(np.arange(gw), cols[0], cols[-1])
        return (iy[:, None] * gw + ix[None, :]).reshape(-1).astype(np.int64)


def no_content_message(original_hw: Sequence[int], canvas_hw: Sequence[int]) -> str:
    h, w = original_hw
    return (f"a {w}x{h} image leaves no feature cell of image content on the {canvas_hw[1]}x{canvas_hw[0]} canvas "
            "(too thin for this geometry)")


def box_max(values: np.ndarray, window: int) -> float:
    """Maximum of the window x window moving average of a 2-D array (window clipped to its size).

    Running sums along each axis in float64, in numpy alone: band-matrix products through BLAS were
    faster in isolation but left OpenBLAS threads spinning against onnxruntime's on the scoring path.
    Along the contiguous axis first: 1.4x faster on a 320 x 320 map than rows first.
    """
    h, w = values.shape
    ky, kx = min(window, h), min(window, w)
    if ky <= 1 and kx <= 1:
        return float(values.max())
    c = np.cumsum(values, axis=1, dtype=np.float64)
    cols = c[:, kx - 1 :].copy()  # cols[:, j] = sum of values[:, j .. j + kx - 1]
    cols[:, 1:] -= c[:, :-kx]
    c = np.cumsum(cols, axis=0)
    sums = c[ky - 1 :].copy()
    sums[1:] -= c[:-ky]
    return float(sums.max() / (ky * kx))


# -- the geometry -----------------------------------------------------------------------------------


class Geometry:
    """Prepares images for the model and restores maps to the images' own size (see module doc)."""

    def __init__(
        self, cfg: GeometryConfig, image_size: int, grid: tuple[int, int] | None = None,
        image_window: int = ScoringConfig.image_window, content_extent: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.image_size = int(image_size)
        self.grid = tuple(int(g) for g in grid) if grid is not None else None  # the trained grid, when known
        # letterbox: ((min, max) content height, (min, max) content width) on the canvas over the training
        # images, when known (bundles before it: None, unchecked)
        self.content_extent = (None if content_extent is None
                               else tuple((int(lo), int(hi)) for lo, hi in content_extent))
        self.tile_size = int(cfg.tile_size or image_size)
        if image_window < 0:
            raise ValueError(f"image_window is a number of patches >= 0, got {image_window}")
        self.image_window = int(image_window)  # image score: max of the map averaged over this many patches squared
        if cfg.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {cfg.max_pixels}")
        if not 0 <= cfg.pad_value <= 255:
            raise ValueError(f"pad_value is a grey level in [0, 255], got {cfg.pad_value}")
        if cfg.policy != "resize" and not cfg.tile and self.image_size % 16:
            raise ValueError(f"policy {cfg.policy!r} needs an image size divisible by 16, got {self.image_size}")
        if cfg.tile:
            if self.tile_size % 16 or self.tile_size <= 0:
                raise ValueError(f"tile_size must be a positive multiple of 16, got {self.tile_size}")
            if cfg.tile_overlap % STRIDE or not 0 <= cfg.tile_overlap < self.tile_size:
                raise ValueError(
                    f"tile_overlap must be a multiple of {STRIDE} in [0, tile_size={self.tile_size}), got {cfg.tile_overlap}"
                )
            if not cfg.tile_scale > 0:
                raise ValueError(f"tile_scale must be positive, got {cfg.tile_scale}")
            self.weights = blend_weights(self.tile_size // STRIDE, cfg.tile_overlap // STRIDE)

    @classmethod
    def from_config(cls, cfg: Any, grid: tuple[int, int] | None = None,
                    content_extent: Sequence[Sequence[int]] | None = None) -> "Geometry":
        """From a TrainConfig (and the trained grid and content extent)."""
        return cls(cfg.geometry, cfg.features.image_size, grid, cfg.scoring.image_window, content_extent)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Geometry":
        """From a bundle's, an ensemble's or an export's manifest.json (config + grid), without torch."""
        config = manifest.get("config")
        if config is None:  # an ensemble: members share the default resize and one image size
            return cls(GeometryConfig(), int(manifest["image_size"]))
        fields = {k: v for k, v in (config.get("geometry") or {}).items() if k in GeometryConfig.__dataclass_fields__}
        grid = manifest.get("grid")
        window = (config.get("scoring") or {}).get("image_window", LEGACY_SCORING["image_window"])  # old bundles: plain max
        return cls(GeometryConfig(**fields), int(config["features"]["image_size"]), tuple(grid) if grid else None,
                   int(window), manifest.get("content_extent"))

    def with_max_pixels(self, max_pixels: int) -> "Geometry":
        """The same geometry with another image-size limit (a scoring run's --max-pixels)."""
        from dataclasses import replace

        return Geometry(replace(self.cfg, max_pixels=int(max_pixels)), self.image_size, self.grid, self.image_window,
                        self.content_extent)

    def spec(self) -> dict[str, Any]:
        """A JSON-able manifest excerpt that `from_manifest` turns back into this geometry (for workers)."""
        from dataclasses import asdict

        return {"config": {"geometry": asdict(self.cfg), "features": {"image_size": self.image_size},
                           "scoring": {"image_window": self.image_window}},
                "grid": list(self.grid) if self.grid is not None else None,
                "content_extent": None if self.content_extent is None else [list(e) for e in self.content_extent]}

    @property
    def max_pixels(self) -> int:
        return int(self.cfg.max_pixels)

    @property
    def tiled(self) -> bool:
        return bool(self.cfg.tile)

    @property
    def pads(self) -> bool:
        """Whether some cells can be padding (letterbox, tiling): the scorer then fills them."""
        return self.tiled or self.cfg.policy == "letterbox"

    def canvas_hw(self) -> tuple[int, int]:
        """The model-input canvas of the trained grid (every scored image has it)."""
        if self.cfg.policy == "resize" and not self.tiled:
            return self.image_size, self.image_size
        if self.grid is None:
            raise ValueError(f"geometry '{self.describe()}' without a trained grid has no fixed canvas size")
        return self.grid[0] * STRIDE, self.grid[1] * STRIDE

    def model_input_hw(self) -> tuple[int, int]:
        """What the backbone sees: one tile when tiling, else the canvas."""
        return (self.tile_size, self.tile_size) if self.tiled else self.canvas_hw()

    def mlp_crop(self) -> tuple[int, int] | None:
        """Grid crop the neighbourhood MLP trains on: one tile's grid when tiling, else the whole grid."""
        if not self.tiled:
            return None
        t = self.tile_size // STRIDE
        return (t, t)

    def describe(self) -> str:
        if self.tiled:
            c = self.cfg
            return f"tiles {self.tile_size}px, overlap {c.tile_overlap}px, scale {c.tile_scale:g}"
        return f"{self.cfg.policy} {self.image_size}px"

    # -- images in ---------------------------------------------------------------------------

    def load(self, path: Path | str) -> np.ndarray:
        """Decode with this geometry's pixel limit (ImageError above it, never a silent downsample) and its
        16-bit white level."""
        return load_rgb(path, self.max_pixels, self.cfg.white_level)

    def read_options(self) -> dict[str, Any]:
        """How `load` reads files, as `load_category` takes it to check a data set's images before any work."""
        return {"max_pixels": self.max_pixels, "white_level": self.cfg.white_level}

    def _check_array(self, rgb: np.ndarray) -> None:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ImageError(
                f"expected an (H, W, 3) uint8 RGB array, got {getattr(rgb, 'dtype', type(rgb))} "
                f"{getattr(rgb, 'shape', '')}"
            )
        h, w = rgb.shape[:2]
        if h == 0 or w == 0:
            raise ImageError(f"image has zero size {w}x{h}")
        if h * w > self.max_pixels:
            raise ImageError(
                f"image {w}x{h} = {h * w} pixels exceeds the limit of {self.max_pixels} "
                f"({TOO_BIG_HINT})"
            )

    def _canvas(self, resized: np.ndarray, canvas_hw: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
        canvas = np.full((*canvas_hw, 3), self.cfg.pad_value, dtype=np.uint8)
        y, x = at
        canvas[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
        return canvas

    def tiles_for(self, canvas_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """(y, x) tile offsets of a canvas; () when not tiling."""
        if not self.tiled:
            return ()
        ys = tile_starts(canvas_hw[0], self.tile_size, self.cfg.tile_overlap)
        xs = tile_starts(canvas_hw[1], self.tile_size, self.cfg.tile_overlap)
        return tuple((y, x) for y in ys for x in xs)

    def layout(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The canvas (height, width) an h x w image is prepared to and its content box (y0, x0, y1, x1) on it:
        what `prepare` fills, known from the size alone."""
        s = self.image_size
        if self.tiled:
            t = self.tile_size
            hs, ws = max(1, round(h * self.cfg.tile_scale)), max(1, round(w * self.cfg.tile_scale))
            return (_ceil_to(max(hs, t), STRIDE), _ceil_to(max(ws, t), STRIDE)), (0, 0, hs, ws)
        if self.cfg.policy == "resize":
            return (s, s), (0, 0, s, s)
        if self.cfg.policy == "letterbox":  # the long side the canvas's, centred
            scale = s / max(h, w)
            hr, wr = min(s, max(1, round(h * scale))), min(s, max(1, round(w * scale)))
            y0, x0 = (s - hr) // 2, (s - wr) // 2
            return (s, s), (y0, x0, y0 + hr, x0 + wr)
        scale = s / min(h, w)  # short-side
        if h <= w:
            hr, wr = s, max(16, int(round(w * scale / 16)) * 16)
        else:
            hr, wr = max(16, int(round(h * scale / 16)) * 16), s
        return (hr, wr), (0, 0, hr, wr)

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """(H, W, 3) uint8 -> the model-input canvas, its content box and the way back."""
        self._check_array(rgb)
        h, w = rgb.shape[:2]
        canvas_hw, content = self.layout(h, w)
        y0, x0, y1, x1 = content
        resized = resize_rgb(rgb, (y1 - y0, x1 - x0))
        canvas = resized if (y1 - y0, x1 - x0) == canvas_hw else self._canvas(resized, canvas_hw, (y0, x0))
        return Prepared(canvas, (h, w), content, self.tiles_for(canvas_hw))

    def training_extent(self, paths: Sequence[Path | str]) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Training images checked from their headers (upright sizes), before any feature: one too thin for the
        geometry is named (`check_layout`). Returns what letterbox (untiled) records for `check`: the range of
        content heights and widths they fill on the canvas; None for other geometries, whose canvas holds
        content only (resize and short-side read no header: they neither pad nor record)."""
        if not self.pads:
            return None
        boxes = []
        for path, hw, canvas_hw, content in self._header_layouts(paths):
            self.check_layout(hw, canvas_hw, content, str(path))
            boxes.append((content[2] - content[0], content[3] - content[1]))
        if self.cfg.policy != "letterbox" or self.tiled or not boxes:
            return None
        return (min(b[0] for b in boxes), max(b[0] for b in boxes)), (min(b[1] for b in boxes), max(b[1] for b in boxes))

    def _header_layouts(self, paths: Sequence[Path | str]) -> Iterator[tuple[Path | str, tuple[int, int],
                                                                             tuple[int, int], tuple[int, int, int, int]]]:
        """(path, upright (h, w), canvas, content box) of each image, from its header alone."""
        for path in paths:
            w, h = image_size(path, self.max_pixels)
            yield (path, (h, w), *self.layout(h, w))

    def check_fits(self, paths: Sequence[Path | str]) -> None:
        """Refuse, naming every one, images whose layout the model refuses (`check_layout`, from their headers)
        before any is scored: one at a time, only the first was named, after the images before it were scored."""
        if not self.pads:
            return
        problems = []
        for path, hw, canvas_hw, content in self._header_layouts(paths):
            try:
                self.check_layout(hw, canvas_hw, content, str(path))
            except GeometryError as exc:
                problems.append(str(exc))
        if len(problems) > 1:
            raise GeometryError(f"{len(problems)} of {len(paths)} images do not fit the model:\n- " + "\n- ".join(problems))
        if problems:
            raise GeometryError(problems[0])

    def rebuild(self, canvas: np.ndarray, original_hw: Sequence[int], content: Sequence[int]) -> Prepared:
        """A Prepared from what a pipeline stage shipped (canvas, original size, content box)."""
        canvas = np.asarray(canvas, np.uint8)
        hw = (int(canvas.shape[0]), int(canvas.shape[1]))
        return Prepared(canvas, (int(original_hw[0]), int(original_hw[1])), tuple(int(c) for c in content),  # type: ignore[arg-type]
                        self.tiles_for(hw))

    def check(self, prepared: Prepared, grid: tuple[int, int] | None = None, name: str = "image") -> None:
        """Refuse an image whose feature grid differs from the trained (or expected) one, then what
        `check_content` refuses."""
        expected = grid if grid is not None else self.grid
        if expected is None or tuple(expected) == prepared.grid:
            self.check_content(prepared, name)
            return
        h, w = prepared.original_hw
        hc, wc = prepared.canvas_hw
        eh, ew = expected
        raise GeometryError(
            f"{name}: {w}x{h} becomes a {wc}x{hc} model input under '{self.describe()}', a {prepared.grid[0]}x"
            f"{prepared.grid[1]} feature grid (h x w), but the model was trained on a {eh}x{ew} grid "
            f"(model input {ew * STRIDE}x{eh * STRIDE}): score images of the training aspect ratio"
            f"{' and size' if self.tiled else ''}, or retrain"
        )

    def check_content(self, prepared: Prepared, name: str = "image") -> None:
        """`check_layout` of a prepared image."""
        self.check_layout(prepared.original_hw, prepared.canvas_hw, prepared.content, name)

    def check_layout(self, original_hw: Sequence[int], canvas_hw: tuple[int, int], content: Sequence[int],
                     name: str = "image") -> None:
        """Refuse, naming the image: one too thin to leave a cell of content (padded geometries), and under
        letterbox one that fills more or less of the canvas than every training image did (EXTENT_SLACK)."""
        valid = cell_validity(tuple(content), canvas_hw) if self.pads else None  # type: ignore[arg-type]
        if valid is not None and not valid.any():
            raise GeometryError(f"{name}: {no_content_message(original_hw, canvas_hw)}")
        if self.content_extent is None or self.cfg.policy != "letterbox" or self.tiled:
            return
        y0, x0, y1, x1 = content
        (h_lo, h_hi), (w_lo, w_hi) = self.content_extent
        if h_lo - EXTENT_SLACK <= y1 - y0 <= h_hi + EXTENT_SLACK and w_lo - EXTENT_SLACK <= x1 - x0 <= w_hi + EXTENT_SLACK:
            return
        h, w = original_hw
        trained = " x ".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in ((w_lo, w_hi), (h_lo, h_hi)))
        s = self.image_size
        raise GeometryError(
            f"{name}: {w}x{h} fills {x1 - x0} x {y1 - y0} px of the {s} x {s} letterbox canvas, the training images "
            f"{trained} px (width x height): the padding's edge would lie where the model saw none, which scores as a "
            "defect. Score images of the training aspect ratios, or retrain with such images among them"
        )

    def tile_stack(self, prepared: Prepared) -> np.ndarray:
        """(n_tiles, 3, t, t) float32 model inputs of a tiled image."""
        t = self.tile_size
        return to_float(np.stack([prepared.canvas[y : y + t, x : x + t] for y, x in prepared.tiles]))

    def stitch_tiles(self, tile_features: np.ndarray, prepared: Prepared) -> np.ndarray:
        """Features of `tile_stack(prepared)` -> the whole-image grid (D, gh, gw)."""
        offsets = [(y // STRIDE, x // STRIDE) for y, x in prepared.tiles]
        return stitch(tile_features, offsets, prepared.grid, self.weights)

    # -- maps out ----------------------------------------------------------------------------

    @staticmethod
    def content_map(canvas_map: np.ndarray, prepared: Prepared) -> np.ndarray:
        """The content region of a canvas-sized map."""
        if tuple(canvas_map.shape[-2:]) != prepared.canvas_hw:
            raise ValueError(f"map {tuple(canvas_map.shape)} is not canvas-sized {prepared.canvas_hw}")
        y0, x0, y1, x1 = prepared.content
        return canvas_map[y0:y1, x0:x1]

    def restore(self, canvas_map: np.ndarray, prepared: Prepared) -> np.ndarray:
        """A canvas map -> (H, W) float32 over the original image, padding cropped away."""
        self.content_map(canvas_map, prepared)  # checks the map is canvas-sized
        return restore_map(canvas_map, prepared.content, prepared.original_hw)

    def image_score(self, canvas_map: np.ndarray, prepared: Prepared) -> float:
        """Maximum over the image content (never padding) of the map averaged over image_window^2 patches.

        A defect covers several patches while a single high patch on a good image is mostly noise:
        averaging before the maximum is worth ~3 points of image AUROC on transistor.
        """
        return box_max(self.content_map(np.asarray(canvas_map), prepared), self.image_window * STRIDE)
