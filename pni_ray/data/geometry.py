"""Image geometry: images of any shape and size -> model inputs -> maps at the image's own size.

One `Geometry` (built from `GeometryConfig` and the model image size S) is used by training,
calibration, evaluation and scoring alike, so every path sees the same pixels:

* ``resize``     today's squash to S x S (kept for comparison; byte-identical to the old path).
* ``letterbox``  keep the aspect ratio, scale the long side to S, centre on an S x S canvas of
  grey level ``pad_value``. Feature-grid cells (stride 8) that are mostly padding are *invalid*:
  training leaves them out of the coreset candidates, the position-prior counts and the MLP
  loss; maps are cropped to the content before they are resized to the original size, and the
  image score is the maximum over the content only, so metrics never see padding.
* ``short-side`` keep the aspect ratio, scale the short side to S and the long side to the
  nearest multiple of 16; the feature grid has that shape and the position prior is indexed on
  it. An image whose grid differs from the training grid (another aspect ratio) is refused with
  an error naming both shapes.
* ``tile``       (any policy; the policy is then not used) the image is scaled by ``tile_scale``
  keeping its aspect, padded (invalid cells) to at least one tile and to a multiple of 8, and
  covered with overlapping tiles of ``tile_size`` whose starts lie on the stride-8 grid. The
  tiles' features are stitched into one whole-image feature grid with linear (triangular) weights
  that fall off over the overlap, so coreset, MLP, position prior and scoring all run on the
  whole-image grid and the prior is indexed by position in the whole image, not per tile.

Cost of tiling: a tiled image has (H * W * tile_scale^2) / S^2 times as many patches as a
resized one, plus the overlap. Training stays feasible on a few CPU cores through (1)
``CoresetConfig.max_candidates``: a seeded random subsample of the patch rows is the coreset's
candidate pool (the greedy k-center cost is candidates x |C_emb|), (2) the neighbourhood MLP
trains on seeded random crops of one tile's grid size (plus the window margin) instead of the
whole-image grid, and (3) the existing chunked nearest-neighbour code, which keeps temporaries
bounded whatever the number of patches. Features of the memory images are held once, in
channels-last layout, so flattening them into patch rows costs no copy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pni_ray.config import GeometryConfig, TrainConfig
from pni_ray.data.images import ImageError, load_rgb
from pni_ray.data.transforms import resize_rgb, to_tensor
from pni_ray.evaluate import upsample_to

if TYPE_CHECKING:
    from pni_ray.evaluate import ModeResult
    from pni_ray.models.features import PatchFeatureExtractor
    from pni_ray.models.pni import PNIDetector

POLICIES: tuple[str, ...] = ("resize", "letterbox", "short-side")
STRIDE = 8  # feature stride of PatchFeatureExtractor (pni_ray.models.features.FEATURE_STRIDE)
NEEDS_MLP = ("neighbourhood", "pni", "pni_split")


class GeometryError(ValueError):
    """An image whose geometry does not fit the trained model (e.g. another aspect ratio)."""


@dataclass
class Prepared:
    """One image made ready for the model, and what is needed to map results back to it."""

    image: torch.Tensor  # (3, Hc, Wc) float32 in [0, 1]: the model-input canvas
    original_hw: tuple[int, int]  # (H, W) of the image as given
    content: tuple[int, int, int, int]  # (y0, x0, y1, x1): the image's region in canvas pixels
    valid: torch.Tensor | None  # (gh, gw) bool on the stride-8 grid; None: every position valid
    tiles: tuple[tuple[int, int], ...] = ()  # (y, x) canvas offsets of tiles; () when not tiled

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.canvas_hw
        return math.ceil(h / STRIDE), math.ceil(w / STRIDE)

    def valid_grid(self) -> torch.Tensor:
        return self.valid if self.valid is not None else torch.ones(self.grid, dtype=torch.bool)

    def fill_index(self) -> torch.Tensor | None:
        """(gh * gw,) flat index of each cell's nearest valid cell (itself when valid); None if all valid."""
        if self.valid is None:
            return None
        from scipy import ndimage

        _, (iy, ix) = ndimage.distance_transform_edt(~self.valid.numpy(), return_indices=True)
        return torch.from_numpy((iy * self.grid[1] + ix).reshape(-1)).long()


def fill_invalid(patch_scores: torch.Tensor, prepared: Sequence[Prepared]) -> torch.Tensor:
    """Patch scores (B, gh, gw) with padded cells set to their nearest valid cell's score.

    Padding features are far from every memory entry (padding never enters the coreset), so their
    raw scores are high; without this, upsampling and the Gaussian blur would spill them into the
    image content along the padding border.
    """
    out = patch_scores
    for i, p in enumerate(prepared):
        index = p.fill_index()
        if index is not None:
            if out is patch_scores:
                out = patch_scores.clone()
            out[i] = patch_scores[i].reshape(-1)[index].view(patch_scores.shape[1:])
    return out


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def cell_validity(content: tuple[int, int, int, int], canvas_hw: tuple[int, int], min_fraction: float = 0.5) -> torch.Tensor | None:
    """(gh, gw) bool: cells whose area is at least `min_fraction` image content; None if all are."""
    y0, x0, y1, x1 = content
    h, w = canvas_hw
    gh, gw = math.ceil(h / STRIDE), math.ceil(w / STRIDE)

    def cover(lo: int, hi: int, n: int) -> torch.Tensor:
        starts = torch.arange(n, dtype=torch.float64) * STRIDE
        return ((starts + STRIDE).clamp(max=hi) - starts.clamp(min=lo)).clamp(min=0) / STRIDE

    frac = cover(y0, y1, gh)[:, None] * cover(x0, x1, gw)[None, :]
    valid = frac >= min_fraction
    return None if bool(valid.all()) else valid


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts (multiples of 8) covering [0, length) with at least `overlap` px between tiles.

    `length` and `tile` are multiples of 8. The fewest tiles that respect the overlap are used
    and spread evenly; the last tile ends exactly at `length`.
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    span = (length - tile) // STRIDE
    return [int(round(i * span / (n - 1))) * STRIDE for i in range(n)]


def blend_weights(tile_cells: int, overlap_cells: int) -> torch.Tensor:
    """(t, t) linear ramp weights: 1 inside, falling linearly to ~0 at the tile edges over the overlap."""
    i = torch.arange(tile_cells, dtype=torch.float32)
    if overlap_cells <= 0:
        ramp = torch.ones(tile_cells)
    else:
        ramp = torch.minimum((i + 0.5) / overlap_cells, (tile_cells - i - 0.5) / overlap_cells).clamp(max=1.0)
    return ramp[:, None] * ramp[None, :]


def stitch(
    tile_features: torch.Tensor, offsets: Sequence[tuple[int, int]], grid: tuple[int, int], weights: torch.Tensor
) -> torch.Tensor:
    """Tile feature grids (n, D, t, t) at cell offsets -> whole-image grid (D, gh, gw), weighted mean."""
    n, d, th, tw = tile_features.shape
    acc = torch.zeros(d, *grid, dtype=tile_features.dtype)
    total = torch.zeros(grid, dtype=tile_features.dtype)
    w = weights.to(tile_features.dtype)
    for f, (oy, ox) in zip(tile_features, offsets):
        acc[:, oy : oy + th, ox : ox + tw] += f * w
        total[oy : oy + th, ox : ox + tw] += w
    if bool((total <= 0).any()):
        raise AssertionError("tiles do not cover the whole grid")  # tile_starts guarantees coverage
    return acc / total


class Geometry:
    """Prepares images for the model and restores maps to the images' own size (see module doc)."""

    def __init__(self, cfg: GeometryConfig, image_size: int, grid: tuple[int, int] | None = None) -> None:
        if cfg.policy not in POLICIES:
            raise ValueError(f"unknown geometry policy {cfg.policy!r}; choose from {POLICIES}")
        self.cfg = cfg
        self.image_size = int(image_size)
        self.grid = tuple(grid) if grid is not None else None  # the trained feature grid, when known
        self.tile_size = int(cfg.tile_size or image_size)
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
    def from_config(cls, cfg: TrainConfig, grid: tuple[int, int] | None = None) -> "Geometry":
        return cls(cfg.geometry, cfg.features.image_size, grid)

    @property
    def is_default(self) -> bool:
        """Today's squash: callers keep their original code path (byte-identical results)."""
        return self.cfg.policy == "resize" and not self.cfg.tile

    @property
    def max_pixels(self) -> int:
        return int(self.cfg.max_pixels)

    @property
    def tiled(self) -> bool:
        return bool(self.cfg.tile)

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
        """Decode with this geometry's pixel limit (ImageError above it, never a silent downsample)."""
        return load_rgb(path, self.max_pixels)

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
                f"(decompression-bomb guard; raise geometry.max_pixels if this image is genuine)"
            )

    def _canvas(self, resized: np.ndarray, canvas_hw: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
        canvas = np.full((*canvas_hw, 3), self.cfg.pad_value, dtype=np.uint8)
        y, x = at
        canvas[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
        return canvas

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """(H, W, 3) uint8 -> the model-input canvas, its valid grid cells and the way back."""
        self._check_array(rgb)
        h, w = rgb.shape[:2]
        s = self.image_size
        if self.tiled:
            t = self.tile_size
            hs, ws = max(1, round(h * self.cfg.tile_scale)), max(1, round(w * self.cfg.tile_scale))
            hc, wc = _ceil_to(max(hs, t), STRIDE), _ceil_to(max(ws, t), STRIDE)
            canvas = self._canvas(resize_rgb(rgb, (hs, ws)), (hc, wc), (0, 0))
            content = (0, 0, hs, ws)
            ys = tile_starts(hc, t, self.cfg.tile_overlap)
            xs = tile_starts(wc, t, self.cfg.tile_overlap)
            tiles = tuple((y, x) for y in ys for x in xs)
            return Prepared(to_tensor([canvas])[0], (h, w), content, cell_validity(content, (hc, wc)), tiles)
        if self.cfg.policy == "resize":
            return Prepared(to_tensor([resize_rgb(rgb, s)])[0], (h, w), (0, 0, s, s), None)
        if self.cfg.policy == "letterbox":
            scale = s / max(h, w)
            hr, wr = min(s, max(1, round(h * scale))), min(s, max(1, round(w * scale)))
            y0, x0 = (s - hr) // 2, (s - wr) // 2
            canvas = self._canvas(resize_rgb(rgb, (hr, wr)), (s, s), (y0, x0))
            content = (y0, x0, y0 + hr, x0 + wr)
            return Prepared(to_tensor([canvas])[0], (h, w), content, cell_validity(content, (s, s)))
        # short-side
        scale = s / min(h, w)
        if h <= w:
            hr, wr = s, max(16, int(round(w * scale / 16)) * 16)
        else:
            hr, wr = max(16, int(round(h * scale / 16)) * 16), s
        return Prepared(to_tensor([resize_rgb(rgb, (hr, wr))])[0], (h, w), (0, 0, hr, wr), None)

    def check(self, prepared: Prepared, grid: tuple[int, int] | None = None, name: str = "image") -> None:
        """Refuse an image whose feature grid differs from the trained (or expected) one."""
        expected = grid if grid is not None else self.grid
        if expected is None or tuple(expected) == prepared.grid:
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

    # -- features ----------------------------------------------------------------------------

    @torch.no_grad()
    def features(
        self, extractor: "PatchFeatureExtractor", prepared: Sequence[Prepared], tile_batch: int = 16
    ) -> torch.Tensor:
        """Feature grids (B, D, gh, gw) of prepared images (tiled ones stitched to the whole image)."""
        if not self.tiled:
            shapes = {p.canvas_hw for p in prepared}
            if len(shapes) > 1:
                first = prepared[0]
                for p in prepared[1:]:
                    self.check(p, first.grid)
            return extractor(torch.stack([p.image for p in prepared]))
        out = []
        for p in prepared:
            t = self.tile_size
            crops = torch.stack([p.image[:, y : y + t, x : x + t] for y, x in p.tiles])
            feats = torch.cat([extractor(crops[i : i + tile_batch]) for i in range(0, len(crops), tile_batch)])
            if feats.shape[-2:] != self.weights.shape:
                raise AssertionError(f"tile features {tuple(feats.shape[-2:])} != tile grid {tuple(self.weights.shape)}")
            offsets = [(y // STRIDE, x // STRIDE) for y, x in p.tiles]
            out.append(stitch(feats, offsets, p.grid, self.weights))
        return torch.stack(out)

    # -- maps out ----------------------------------------------------------------------------

    def content_map(self, canvas_map: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """The content region of a map at canvas size (or any size: it is resized to the canvas first)."""
        hc, wc = prepared.canvas_hw
        if tuple(canvas_map.shape[-2:]) != (hc, wc):
            canvas_map = F.interpolate(canvas_map[None, None].float(), size=(hc, wc), mode="bilinear", align_corners=False)[0, 0]
        y0, x0, y1, x1 = prepared.content
        return canvas_map[y0:y1, x0:x1]

    def restore(self, canvas_map: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """A map (h', w') over the model input -> (H, W) over the original image, padding cropped away."""
        content = self.content_map(canvas_map, prepared)
        hw = prepared.original_hw
        if tuple(content.shape) == tuple(hw):
            return content
        return F.interpolate(content[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]

    def image_score(self, canvas_map: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """Maximum of the map over the image content (never over padding)."""
        return self.content_map(canvas_map, prepared).max()


# -- whole-pipeline helpers ----------------------------------------------------------------------


def detector_geometry(detector: object) -> Geometry | None:
    return getattr(detector, "geometry", None)


def _chunks(n: int, geometry: Geometry, batch_size: int) -> Iterable[slice]:
    step = 1 if geometry.tiled else max(1, batch_size)  # a tiled image is already a batch of tiles
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


@torch.no_grad()
def _score_prepared(
    detector: "PNIDetector",
    geometry: Geometry,
    prepared: list[Prepared],
    names: Sequence[str],
    batch_size: int,
    t_prep: float = 0.0,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]], dict[str, float]]:
    """Canvas maps, image scores and seconds per mode for one batch of prepared images."""
    for p in prepared:
        geometry.check(p)
    t0 = time.perf_counter()
    features = geometry.features(detector.extractor, prepared, tile_batch=batch_size)
    t_feat = t_prep + time.perf_counter() - t0
    modes = [n.removesuffix("+refine") for n in names]
    p_dist, t_mlp = None, 0.0
    if detector.mlp is not None and any(m in NEEDS_MLP for m in modes):
        t1 = time.perf_counter()
        p_dist = detector.mlp.probabilities(features)
        t_mlp = time.perf_counter() - t1
    canvas = torch.stack([p.image for p in prepared]) if any(n.endswith("+refine") for n in names) else None
    maps: dict[str, list[torch.Tensor]] = {}
    scores: dict[str, list[torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    for name, mode in zip(names, modes):
        t2 = time.perf_counter()
        patch = fill_invalid(detector.scorer(features, p_dist, mode), prepared)
        batch_maps = detector.mapper(patch, prepared[0].canvas_hw)
        if name.endswith("+refine"):
            if detector.refiner is None:
                raise ValueError("this bundle has no refiner")
            batch_maps = detector.refiner(canvas, batch_maps)
        maps[name] = list(batch_maps)
        scores[name] = [geometry.image_score(m, p) for m, p in zip(batch_maps, prepared)]
        seconds[name] = t_feat + (t_mlp if mode in NEEDS_MLP else 0.0) + time.perf_counter() - t2
    return maps, scores, seconds


@torch.no_grad()
def predict_images(
    detector: "PNIDetector",
    images: Sequence[np.ndarray],
    mode: str | None = None,
    refine: bool | None = None,
    batch_size: int = 8,
    geometry: Geometry | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """uint8 (H, W, 3) images of any size -> anomaly maps at each image's own (H, W), and image scores.

    The detector's geometry (recorded in its bundle) decides how images are prepared; with the
    default `resize` this is exactly `detector(resize(images))` followed by bilinear upsampling.
    """
    geometry = geometry or detector_geometry(detector) or Geometry(GeometryConfig(), detector.image_size)
    mode = mode or detector.mode
    use_refiner = (refine if refine is not None else detector.refiner is not None) and detector.refiner is not None
    name = f"{mode}+refine" if use_refiner else mode
    out_maps: list[np.ndarray] = []
    out_scores: list[float] = []
    if geometry.is_default:
        for i in range(0, len(images), max(1, batch_size)):
            batch = list(images[i : i + batch_size])
            for rgb in batch:
                geometry._check_array(rgb)
            maps, scores = detector(to_tensor([resize_rgb(o, detector.image_size) for o in batch]), mode, use_refiner)
            out_maps.extend(upsample_to(m, o.shape[:2]) for m, o in zip(maps, batch))
            out_scores.extend(float(s) for s in scores)
        return out_maps, np.asarray(out_scores, dtype=np.float32)
    for sl in _chunks(len(images), geometry, batch_size):
        prepared = [geometry.prepare(rgb) for rgb in images[sl]]
        maps, scores, _ = _score_prepared(detector, geometry, prepared, [name], batch_size)
        out_maps.extend(geometry.restore(m, p).numpy() for m, p in zip(maps[name], prepared))
        out_scores.extend(float(s) for s in scores[name])
    return out_maps, np.asarray(out_scores, dtype=np.float32)


@torch.no_grad()
def run_modes_geometry(
    detector: "PNIDetector",
    paths: list[Path],
    modes: tuple[str, ...],
    batch_size: int = 8,
    refine_modes: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, "ModeResult"]:
    """`evaluate.run_modes` for a non-default geometry: features shared by the modes, maps restored
    to each image's own size (padding cropped), image scores over the content only."""
    from pni_ray.evaluate import ModeResult

    geometry = detector_geometry(detector)
    assert geometry is not None
    names = list(modes) + [f"{m}+refine" for m in refine_modes]
    maps: dict[str, list[np.ndarray]] = {n: [] for n in names}
    scores: dict[str, list[float]] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    chunks = list(_chunks(len(paths), geometry, batch_size))
    for sl in tqdm(chunks, desc="scoring", unit="batch", disable=not progress, leave=False):
        originals = [geometry.load(p) for p in paths[sl]]
        t0 = time.perf_counter()
        prepared = [geometry.prepare(o) for o in originals]
        for p, path in zip(prepared, paths[sl]):
            geometry.check(p, name=str(path))
        batch_maps, batch_scores, batch_seconds = _score_prepared(
            detector, geometry, prepared, names, batch_size, time.perf_counter() - t0
        )
        for n in names:
            seconds[n] += batch_seconds[n]
            scores[n].extend(float(s) for s in batch_scores[n])
            maps[n].extend(geometry.restore(m, p).numpy() for m, p in zip(batch_maps[n], prepared))
    return {n: ModeResult(maps[n], np.asarray(scores[n], dtype=np.float32), seconds[n]) for n in names}


@torch.no_grad()
def content_maps(
    detector: "PNIDetector", geometry: Geometry, paths: Sequence[Path], batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Maps over the image content (model resolution, padding cropped) and image scores: calibration."""
    mode = detector.mode
    maps_out: list[torch.Tensor] = []
    scores_out: list[torch.Tensor] = []
    for sl in _chunks(len(paths), geometry, batch_size):
        prepared = [geometry.prepare(geometry.load(p)) for p in paths[sl]]
        maps, scores, _ = _score_prepared(detector, geometry, prepared, [mode], batch_size)
        maps_out.extend(geometry.content_map(m, p) for m, p in zip(maps[mode], prepared))
        scores_out.extend(scores[mode])
    return maps_out, torch.stack(scores_out) if scores_out else torch.empty(0)


@torch.no_grad()
def extract_training_features(
    extractor: "PatchFeatureExtractor",
    geometry: Geometry,
    paths: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D, gh, gw) features (a view of channels-last storage: rows = a free reshape) and (N, gh, gw) validity.

    Every image must give the same grid (short-side and tiling keep the aspect ratio): the first
    image sets it and any other is refused with both shapes in the message.
    """
    feats: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    chunks = list(_chunks(len(paths), geometry, batch_size))
    n_done = 0
    for sl in tqdm(chunks, desc=desc, unit="batch", disable=not progress, leave=False):
        prepared = [geometry.prepare(geometry.load(p)) for p in paths[sl]]
        if grid is None:
            grid = prepared[0].grid
        for p, path in zip(prepared, paths[sl]):
            geometry.check(p, grid, name=str(path))
        batch = geometry.features(extractor, prepared, tile_batch=batch_size)
        if feats is None:
            feats = torch.empty(len(paths), grid[0], grid[1], batch.shape[1], dtype=batch.dtype)
            valid = torch.empty(len(paths), grid[0], grid[1], dtype=torch.bool)
        assert valid is not None
        feats[n_done : n_done + len(prepared)] = batch.permute(0, 2, 3, 1)
        valid[n_done : n_done + len(prepared)] = torch.stack([p.valid_grid() for p in prepared])
        n_done += len(prepared)
    if feats is None or valid is None:
        raise ValueError("no training images")
    return feats.permute(0, 3, 1, 2), valid


def candidate_rows(valid: torch.Tensor | None, n_rows: int, max_candidates: int | None, seed: int) -> torch.Tensor | None:
    """Row indices the coreset may choose from: valid positions, seeded-subsampled to the cap.

    None means "every row" (no padding, no cap): the caller keeps its original, copy-free path.
    """
    idx = None
    if valid is not None and not bool(valid.all()):
        idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
    n = n_rows if idx is None else idx.numel()
    if max_candidates and n > max_candidates:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:max_candidates].sort().values
        idx = pick if idx is None else idx[pick]
    return idx


def derive_category(
    src_root: Path | str,
    category: str,
    dst_root: Path | str,
    crop: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write a copy of an MVTec-layout category with every image and mask cropped and/or resized alike.

    crop (top, left, height, width) is applied first, then size (height, width): images bilinear,
    masks nearest. For geometry experiments (non-square crops, upscaled sets); writes PNGs.
    """
    from PIL import Image

    src, dst = Path(src_root) / category, Path(dst_root) / category
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")]
    for path in files:
        rel = path.relative_to(src)
        is_mask = rel.parts[0] == "ground_truth"
        img = Image.open(path)
        img = img.convert("L" if is_mask else "RGB")
        if crop is not None:
            top, left, h, w = crop
            img = img.crop((left, top, left + w, top + h))
        if size is not None:
            img = img.resize((size[1], size[0]), Image.NEAREST if is_mask else Image.BILINEAR)
        out = (dst / rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
    return dst
