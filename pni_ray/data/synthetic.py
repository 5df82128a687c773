"""Deterministic synthetic categories in the MVTec AD directory layout.

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
from scipy import ndimage, special

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
FloatImage = np.ndarray  # float32, (H, W, 3), nominal range 0..255
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


# --------------------------------------------------------------------------
# Small drawing helpers (float32, pixel centres at integer coordinates).
# Shapes are evaluated in a local window only: defects are small and a full
# frame evaluation per shape would dominate the generation time.
# --------------------------------------------------------------------------


def _window(cy: float, cx: float, reach: float, size: int) -> tuple[slice, slice]:
    """Clipped square window of half-width ``reach`` around (cy, cx)."""
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, size)
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, size)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _coords(win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) of a window, float32."""
    yy, xx = np.mgrid[win[0], win[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def _finish(base: FloatImage, gain: float, noise: np.ndarray) -> np.ndarray:
    """Apply global gain and per-pixel noise, quantise to uint8.

    Noise is added last and is identical for the good and defective renders,
    so only pixels whose underlying scene changed can differ.
    """
    out = base * np.float32(gain)
    out += noise
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _polyline_alpha(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (size x size) of a polyline of the given pixel width."""
    dist = np.full((size, size), np.inf, dtype=np.float32)
    half = width / 2.0
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        reach = 0.5 * float(np.hypot(y1 - y0, x1 - x0)) + half + 2.0
        win = _window(0.5 * (y0 + y1), 0.5 * (x0 + x1), reach, size)
        yy, xx = _coords(win)
        if yy.size == 0:
            continue
        dy, dx = y1 - y0, x1 - x0
        seg2 = dy * dy + dx * dx
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / seg2, 0.0, 1.0) if seg2 > 0 else 0.0
        d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        np.minimum(dist[win], d, out=dist[win])
    return np.clip(half + 0.5 - dist, 0.0, 1.0)


def _random_walk(
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    steps: int,
    wiggle: float,
) -> np.ndarray:
    """Jagged path (crack-like): a random walk with a persistent heading."""
    pts = [np.asarray(start, dtype=np.float64)]
    step = length / steps
    for _ in range(steps):
        angle += rng.normal(0.0, wiggle)
        pts.append(pts[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    return np.stack(pts)


def _blob_alpha(
    rng: np.random.Generator,
    center: np.ndarray,
    radius: float,
    size: int,
    soft: float = 1.0,
    roughness: float = 0.15,
    cutoff: float = 0.0,
) -> np.ndarray:
    """Irregular blob (size x size): a circle whose radius wobbles with a few harmonics.

    ``soft`` is the edge ramp width in pixels; coverage below ``cutoff`` is
    dropped so that no faint, noise-like halo ends up in the mask.
    """
    amps = [rng.uniform(0.0, roughness) / (k - 1) for k in range(2, 6)]
    phases = rng.uniform(0.0, 2 * np.pi, 4)
    alpha = np.zeros((size, size), dtype=np.float32)
    win = _window(center[0], center[1], radius * (1.0 + sum(amps)) + soft + 2.0, size)
    yy, xx = _coords(win)
    if yy.size == 0:
        return alpha
    dy, dx = yy - np.float32(center[0]), xx - np.float32(center[1])
    theta = np.arctan2(dy, dx)
    r_theta = np.ones_like(theta)
    for k, (amp, ph) in enumerate(zip(amps, phases), start=2):
        r_theta += np.float32(amp) * np.cos(k * theta + np.float32(ph))
    local = np.clip((radius * r_theta - np.hypot(dy, dx)) / soft + 0.5, 0.0, 1.0)
    if cutoff > 0:
        local[local < cutoff] = 0.0
    alpha[win] = local
    return alpha


def _paint(gray: np.ndarray, colour: Sequence[float]) -> FloatImage:
    """(H, W) intensity times an RGB colour -> (H, W, 3).

    Channel-wise products plus one stack are several times faster than a
    broadcast against a trailing axis of length 3.
    """
    return np.stack([gray * np.float32(c) for c in colour], axis=-1).astype(np.float32, copy=False)


def _blend(base: FloatImage, colour: np.ndarray, alpha: np.ndarray) -> FloatImage:
    """Alpha-composite a flat or per-pixel colour over ``base`` (returns a new array).

    Only the bounding box of ``alpha > 0`` is touched, as defects are small.
    """
    out = base.copy()
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return out
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a = alpha[win].astype(np.float32, copy=False)
    a3 = np.stack([a, a, a], axis=-1)
    col = np.asarray(colour, dtype=np.float32)
    if col.ndim == 3:
        col = col[win]
    patch = base[win]
    out[win] = patch + a3 * (col - patch)
    return out


# Inverse normal CDF at 256 equiprobable levels: indexing it with random bytes
# gives Gaussian-shaped noise several times faster than standard_normal.
_NOISE_LUT = special.ndtri((np.arange(256) + 0.5) / 256.0).astype(np.float32)


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Per-pixel sensor noise, so images are not separable by global statistics."""
    idx = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.take(_NOISE_LUT * np.float32(sigma), idx)


@dataclass(frozen=True)
class _Flat:
    """A noise-free scene plus the per-image gain and noise shared by both renders."""

    base: FloatImage
    gain: float
    noise: np.ndarray


# --------------------------------------------------------------------------
# 1. weave: periodic texture
# --------------------------------------------------------------------------


def _thread_profile(frac: np.ndarray, coverage: float = 0.8) -> np.ndarray:
    """Cylindrical brightness across a thread; 0 in the gap between threads."""
    t = np.abs(frac - 0.5) * np.float32(2.0 / coverage)
    return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


def _weave_scene(rng: np.random.Generator, size: int) -> _Flat:
    """Plain over-under weave with per-image phase, colour and yarn jitter."""
    period = size / 16.0
    phase = rng.uniform(0.0, period, 2)
    warp = np.array([176.0, 144.0, 102.0]) + rng.normal(0.0, 3.0, 3)
    weft = warp * np.array([0.94, 0.95, 1.0]) + rng.normal(0.0, 2.0, 3)
    backing = np.array([40.0, 33.0, 26.0], dtype=np.float32)
    n_threads = int(np.ceil(size / period)) + 3
    yarn = (1.0 + rng.normal(0.0, 0.035, (2, n_threads))).astype(np.float32)
    gain = float(rng.uniform(0.93, 1.07))
    noise = _noise(rng, size, 4.0)

    # The pattern is separable per axis: work on 1-D profiles, then combine.
    axis = np.arange(size, dtype=np.float32)
    u = (axis + np.float32(phase[1])) / np.float32(period)  # along x
    v = (axis + np.float32(phase[0])) / np.float32(period)  # along y
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    h_prof = (_thread_profile(fv) * yarn[0][iv])[:, None]  # weft, varies with y
    v_prof = (_thread_profile(fu) * yarn[1][iu])[None, :]  # warp, varies with x
    dip_x = (0.72 + 0.28 * np.sin(np.pi * fu))[None, :]  # thread dives at crossings
    dip_y = (0.72 + 0.28 * np.sin(np.pi * fv))[:, None]
    h_over = ((iv[:, None] + iu[None, :]) % 2) == 0
    has_h, has_v = h_prof > 0, v_prof > 0
    top_h = has_h & (h_over | ~has_v)
    top_v = has_v & ~top_h
    # Exactly one of backing / weft / warp shows at each pixel.
    w_h = np.where(top_h, 0.25 + 0.75 * (h_prof * dip_x), np.float32(0))
    w_v = np.where(top_v, 0.25 + 0.75 * (v_prof * dip_y), np.float32(0))
    w_b = (~(top_h | top_v)).astype(np.float32)
    base = np.stack(
        [
            w_b * backing[c] + w_h * np.float32(weft[c]) + w_v * np.float32(warp[c])
            for c in range(3)
        ],
        axis=-1,
    )
    return _Flat(base.astype(np.float32, copy=False), gain, noise)


def _weave_draw(
    scene: _Flat, defect: Optional[str], drng: Optional[np.random.Generator]
) -> np.ndarray:
    """Good image, or one with a scratch / hole / colour stain."""
    base = scene.base
    size = base.shape[0]
    if defect is not None:
        assert drng is not None
        margin = 0.12 * size
        centre = drng.uniform(margin, size - margin, 2)
        if defect == "scratch":
            angle = drng.uniform(0.0, np.pi)
            half = 0.5 * drng.uniform(0.25, 0.5) * size
            offs = half * np.array([np.sin(angle), np.cos(angle)])
            width = max(1.0, size / 160.0) * drng.uniform(1.0, 1.4)
            alpha = _polyline_alpha(np.stack([centre - offs, centre + offs]), width, size)
            base = _blend(base, np.array([246.0, 242.0, 232.0]), alpha)
        elif defect == "hole":
            radius = drng.uniform(0.035, 0.065) * size
            alpha = _blob_alpha(drng, centre, radius, size, soft=1.0, roughness=0.25)
            base = _blend(base, np.array([18.0, 15.0, 13.0]), alpha)
        elif defect == "color":
            radius = drng.uniform(0.06, 0.1) * size
            tints = np.array([[0.85, 0.42, 0.45], [0.5, 0.58, 0.95], [0.62, 0.85, 0.5]])
            tint = tints[drng.integers(len(tints))].astype(np.float32)
            alpha = 0.85 * _blob_alpha(
                drng, centre, radius, size, soft=0.15 * radius, roughness=0.2, cutoff=0.2
            )
            base = _blend(base, base * tint, alpha)
        else:  # pragma: no cover - guarded by render()
            raise ValueError(defect)
    return _finish(base, scene.gain, scene.noise)


# --------------------------------------------------------------------------
# 2. granite: stochastic texture
# --------------------------------------------------------------------------


def _unit(a: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-std field, so contrast does not depend on the image size."""
    a = a - a.mean()
    return (a / (a.std() + 1e-8)).astype(np.float32)


def _granite_scene(rng: np.random.Generator, size: int) -> _Flat:
    """Two-scale filtered noise in a stone palette, plus dark and light grains."""
    s = size / 256.0
    shape = (size, size)
    # One white-noise field shaped in the Fourier domain by a sum of a fine
    # and a coarse Gaussian (periodic, and much cheaper than two big filters).
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    f2 = (fy * fy + fx * fx) * np.float32(2.0 * np.pi**2)
    spectrum = 0.55 * np.exp(-f2 * np.float32((2.5 * s) ** 2))
    spectrum += 4.5 * np.exp(-f2 * np.float32((10.0 * s) ** 2))
    white = rng.standard_normal(shape, dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * spectrum, s=shape)
    mix = (1.0 / (1.0 + np.exp(-1.6 * _unit(field)))).astype(np.float32)
    dark = np.array([96.0, 90.0, 92.0]) + rng.normal(0.0, 4.0, 3)
    light = np.array([198.0, 186.0, 180.0]) + rng.normal(0.0, 4.0, 3)

    grain_sigma = max(0.6, 0.9 * s)
    grains = []
    for colour, density in (((34.0, 30.0, 32.0), 0.004), ((238.0, 234.0, 228.0), 0.002)):
        seeds = np.zeros(shape, dtype=np.float32)
        where = rng.random(shape, dtype=np.float32) < density
        seeds[where] = rng.uniform(0.5, 1.5, int(where.sum()))
        field = ndimage.gaussian_filter(seeds, grain_sigma, mode="wrap")
        alpha = np.clip(field * np.float32(2.0 * np.pi * grain_sigma**2 * 1.6) - 0.2, 0.0, 1.0)
        grains.append((colour, alpha))

    channels = []
    for c in range(3):
        ch = np.float32(dark[c]) + np.float32(light[c] - dark[c]) * mix
        for colour, alpha in grains:
            ch += alpha * (np.float32(colour[c]) - ch)
        channels.append(ch)
    base = np.stack(channels, axis=-1)

    gain = float(rng.uniform(0.93, 1.07))
    noise = _noise(rng, size, 4.0)
    return _Flat(base, gain, noise)


def _granite_draw(
    scene: _Flat, defect: Optional[str], drng: Optional[np.random.Generator]
) -> np.ndarray:
    """Good image, or one with a (possibly branching) crack or a stain."""
    base = scene.base
    size = base.shape[0]
    if defect is not None:
        assert drng is not None
        margin = 0.15 * size
        centre = drng.uniform(margin, size - margin, 2)
        if defect == "crack":
            angle = drng.uniform(0.0, 2 * np.pi)
            length = drng.uniform(0.3, 0.55) * size
            width = max(1.0, 1.6 * size / 256.0) * drng.uniform(1.0, 1.3)
            path = _random_walk(drng, centre, angle, length, 18, 0.35)
            paths = [path]
            if drng.random() < 0.6:  # a side branch, as real cracks often have
                j = int(drng.integers(4, 14))
                turn = float(drng.choice([-1.0, 1.0])) * 0.9
                paths.append(_random_walk(drng, path[j], angle + turn, 0.4 * length, 8, 0.35))
            # Centre the whole crack on ``centre`` so it stays inside the image.
            pts = np.concatenate(paths)
            offset = centre - 0.5 * (pts.min(axis=0) + pts.max(axis=0))
            alpha = _polyline_alpha(paths[0] + offset, width, size)
            if len(paths) > 1:
                alpha = np.maximum(alpha, _polyline_alpha(paths[1] + offset, 0.8 * width, size))
            base = _blend(base, np.array([26.0, 22.0, 22.0]), alpha)
        elif defect == "stain":
            radius = drng.uniform(0.07, 0.11) * size
            tints = np.array([[1.12, 0.74, 0.42], [0.78, 0.55, 0.4]])  # rust, brown oil
            tint = tints[drng.integers(len(tints))].astype(np.float32)
            alpha = 0.9 * _blob_alpha(
                drng, centre, radius, size, soft=0.2 * radius, roughness=0.25, cutoff=0.2
            )
            base = _blend(base, base * tint, alpha)
        else:  # pragma: no cover - guarded by render()
            raise ValueError(defect)
    return _finish(base, scene.gain, scene.noise)


# --------------------------------------------------------------------------
# 3. washer: centred object, fixed pose
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _WasherScene:
    """Layers of the washer image, kept apart so defects can edit the ring itself."""

    bg_col: np.ndarray
    metal_col: np.ndarray
    shade: np.ndarray
    alpha: np.ndarray
    lighting: FloatImage
    good_base: FloatImage
    centre: tuple[float, float]
    r_in: float
    r_out: float
    gain: float
    noise: np.ndarray


def _washer_compose(
    bg_col: np.ndarray, metal_col: np.ndarray, shade: np.ndarray, alpha: np.ndarray
) -> FloatImage:
    """Unlit composite of the ring (coverage ``alpha``) over the plain background."""
    lit = shade * alpha
    return np.stack(
        [np.float32(bg_col[c]) * (1.0 - alpha) + np.float32(metal_col[c]) * lit for c in range(3)],
        axis=-1,
    ).astype(np.float32, copy=False)


def _washer_scene(rng: np.random.Generator, size: int) -> _WasherScene:
    """A machined metal ring on a plain background, with pose jitter and lighting noise."""
    jitter = max(1.0, size / 64.0)
    cy, cx = size / 2.0 - 0.5 + rng.uniform(-jitter, jitter, 2)
    r_out, r_in = 0.34 * size, 0.15 * size
    bg_col = np.array([72.0, 76.0, 82.0]) + rng.normal(0.0, 3.0, 3)
    metal_col = np.array([186.0, 189.0, 195.0]) + rng.normal(0.0, 3.0, 3)
    light_angle = -np.pi / 4 + rng.normal(0.0, 0.1)
    grad_amp = rng.uniform(-0.07, 0.07)
    grad_dir = rng.uniform(0.0, 2 * np.pi)
    gain = float(rng.uniform(0.92, 1.08))
    noise = _noise(rng, size, 3.0)

    axis = np.arange(size, dtype=np.float32)
    dy, dx = (axis - np.float32(cy))[:, None], (axis - np.float32(cx))[None, :]
    d = np.hypot(dy, dx)
    alpha = np.clip(r_out + 0.5 - d, 0.0, 1.0) * np.clip(d - r_in + 0.5, 0.0, 1.0)
    s_rad = np.clip((d - r_in) / (r_out - r_in), 0.0, 1.0)
    shade = (
        0.78
        + 0.2 * np.sin(np.pi * s_rad)
        + 0.08 * np.cos(np.arctan2(dy, dx) - np.float32(light_angle))
        + 0.025 * np.sin(d * np.float32(2 * np.pi / max(2.5, size / 80.0)))  # turning marks
    ).astype(np.float32)
    centred = axis - size / 2.0
    g_x = (
        np.float32(np.cos(grad_dir)) * centred[None, :]
        + np.float32(np.sin(grad_dir)) * centred[:, None]
    )
    lighting = _paint(1.0 + np.float32(grad_amp / size) * g_x, (1.0, 1.0, 1.0))
    good_base = _washer_compose(bg_col, metal_col, shade, alpha)
    return _WasherScene(
        bg_col, metal_col, shade, alpha, lighting, good_base,
        (float(cy), float(cx)), r_in, r_out, gain, noise,
    )


def _washer_draw(
    scene: _WasherScene, defect: Optional[str], drng: Optional[np.random.Generator]
) -> np.ndarray:
    """Good image, or one with a crack, a chipped-off piece or contamination on the ring."""
    base = scene.good_base
    size = base.shape[0]
    cy, cx = scene.centre
    r_in, r_out = scene.r_in, scene.r_out
    if defect is not None:
        assert drng is not None
        ang = drng.uniform(0.0, 2 * np.pi)
        if defect == "missing_piece":
            if drng.random() < 0.7:  # chipped outer rim
                rad = r_out + drng.uniform(-0.01, 0.02) * size
                bite = drng.uniform(0.06, 0.09) * size
            else:  # chipped inner rim
                rad = r_in - drng.uniform(-0.01, 0.01) * size
                bite = drng.uniform(0.045, 0.06) * size
            centre = np.array([cy + rad * np.sin(ang), cx + rad * np.cos(ang)])
            chip = _blob_alpha(drng, centre, bite, size, soft=1.0, roughness=0.3)
            chipped = scene.alpha * (1.0 - chip)
            base = _washer_compose(scene.bg_col, scene.metal_col, scene.shade, chipped)
        else:
            rad = drng.uniform(r_in + 0.2 * (r_out - r_in), r_out - 0.2 * (r_out - r_in))
            centre = np.array([cy + rad * np.sin(ang), cx + rad * np.cos(ang)])
            if defect == "crack":
                heading = ang + drng.normal(0.0, 0.4) + (np.pi if drng.random() < 0.5 else 0.0)
                length = drng.uniform(0.12, 0.2) * size
                start = centre - 0.5 * length * np.array([np.sin(heading), np.cos(heading)])
                path = _random_walk(drng, start, heading, length, 12, 0.3)
                width = max(1.0, size / 170.0) * drng.uniform(1.0, 1.3)
                crack = _polyline_alpha(path, width, size) * scene.alpha
                base = _blend(base, np.array([30.0, 29.0, 30.0]), crack)
            elif defect == "contamination":
                spots = np.zeros((size, size), dtype=np.float32)
                for _ in range(int(drng.integers(1, 4))):
                    c = centre + drng.normal(0.0, 0.03 * size, 2)
                    r = drng.uniform(0.02, 0.045) * size
                    blob = _blob_alpha(drng, c, r, size, soft=0.25 * r, roughness=0.3, cutoff=0.2)
                    spots = np.maximum(spots, blob)
                spots = 0.9 * spots * scene.alpha
                base = _blend(base, base * np.array([0.62, 0.45, 0.26], dtype=np.float32), spots)
            else:  # pragma: no cover - guarded by render()
                raise ValueError(defect)
    return _finish(base * scene.lighting, scene.gain, scene.noise)


# --------------------------------------------------------------------------
# 4. pillbox: logical defects only
# --------------------------------------------------------------------------

# A 5 x 5 tray of compartments.  Per compartment, what good images hold:
#   A / B  always a tablet of that type (A: white, B: black),
#   E      always empty,
#   T      a tablet of either type (random per image),
#   R      a tablet of either type or nothing (random per image).
# Defects only ever touch the fixed compartments of the inner 3 x 3, and only
# by putting there what good images show in the neighbouring random ones: a
# tablet of the other type ("misplaced": two tablets swapped), no tablet
# ("missing") or a tablet where there never is one ("extra").  Each defective
# compartment, with its surroundings, thus looks like a random compartment of
# some good image; what is wrong is only *where* that content is.  The random
# compartments around every defect site also give the neighbours' context (a
# tablet present or not next to them) in good images.  The outer ring hosts
# no defects: next to the image border no random compartment has the same
# surroundings.
_PILL_ROLES = ("ATBTA", "TRARB", "ABERT", "TRBRA", "BTATB")
_PILL_GRID = len(_PILL_ROLES)
_PILL_RADIUS = 0.065  # relative to size; compartment pitch is 0.2, so tablets never touch
_PILL_COLOURS = MappingProxyType(
    {"A": (226.0, 221.0, 206.0), "B": (40.0, 38.0, 42.0)}
)
_PILL_TRAY = (62.0, 98.0, 140.0)
_PILL_CHOICES = MappingProxyType({"T": "AB", "R": "ABE"})
_PILL_SLOTS = tuple((i, j) for i in range(_PILL_GRID) for j in range(_PILL_GRID))
_PILL_INNER = tuple(
    k for k, (i, j) in enumerate(_PILL_SLOTS)
    if 0 < i < _PILL_GRID - 1 and 0 < j < _PILL_GRID - 1
)


def _pill_role(k: int) -> str:
    i, j = _PILL_SLOTS[k]
    return _PILL_ROLES[i][j]


@dataclass(frozen=True)
class _PillScene:
    """Tray colour, one sprite per tablet type, compartment centres and contents, gain, noise."""

    background: np.ndarray
    sprites: Mapping[str, FloatImage]
    sprite_alpha: np.ndarray
    half: int
    centres: tuple[tuple[int, int], ...]
    contents: tuple[str, ...]  # per compartment: "A", "B" or "E" (empty)
    gain: float
    noise: np.ndarray


def _pill_shape(size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Shading and coverage of a round tablet, shared by both types.

    Coverage below 0.25 is dropped so that every footprint pixel visibly
    changes when a tablet is removed, added or replaced by the other type
    (footprint == changed pixels).
    """
    r = _PILL_RADIUS * size
    half = int(np.ceil(r)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    d = np.hypot(yy, xx)
    alpha = np.clip(r + 0.5 - d, 0.0, 1.0)
    alpha[alpha < 0.25] = 0.0
    shade = 1.0 - 0.2 * np.clip(d / r, 0.0, 1.0) ** 2
    return shade.astype(np.float32), alpha.astype(np.float32), half


def _pillbox_scene(rng: np.random.Generator, size: int) -> _PillScene:
    """Fixed 5 x 5 layout, random contents of the T / R compartments, small jitter.

    No lighting gradient on purpose: a tablet anywhere looks like a tablet of
    its type anywhere else, and empty tray like empty tray.
    """
    background = (np.array(_PILL_TRAY) + rng.normal(0.0, 3.0, 3)).astype(np.float32)
    shade, alpha, half = _pill_shape(size)
    sprites = {}
    for kind in ("A", "B"):
        colour = np.array(_PILL_COLOURS[kind]) + rng.normal(0.0, 3.0, 3)
        sprites[kind] = np.stack([shade * np.float32(c) for c in colour], axis=-1)
    pitch = size / _PILL_GRID
    shift = rng.uniform(-0.5, 0.5, 2) * max(1.0, size / 96.0)
    jitter = rng.uniform(-0.5, 0.5, (len(_PILL_SLOTS), 2)) * max(1.0, size / 128.0)
    grid = (np.array(_PILL_SLOTS, dtype=np.float64) + 0.5) * pitch - 0.5
    centres = np.rint(grid + shift + jitter).astype(int)
    picks = rng.integers(0, 6, len(_PILL_SLOTS))  # 6 = lcm of the choice counts
    contents = []
    for k, pick in enumerate(picks):
        role = _pill_role(k)
        choices = _PILL_CHOICES.get(role, role)
        contents.append(choices[int(pick) % len(choices)])
    gain = float(rng.uniform(0.92, 1.08))
    noise = _noise(rng, size, 3.0)
    return _PillScene(
        background, MappingProxyType(sprites), alpha, half,
        tuple((int(y), int(x)) for y, x in centres), tuple(contents), gain, noise,
    )


def _pill_window(
    centre: tuple[int, int], half: int, size: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Image window of a sprite centred at ``centre`` and the matching sprite window (clipped)."""
    cy, cx = centre
    y0, x0 = cy - half, cx - half
    ys = slice(max(y0, 0), min(cy + half + 1, size))
    xs = slice(max(x0, 0), min(cx + half + 1, size))
    sub = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    return (ys, xs), sub


def _pillbox_draw(
    scene: _PillScene, defect: Optional[str], drng: Optional[np.random.Generator]
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Good image, or one with a tablet missing, two swapped, or one extra; plus its footprint."""
    size = scene.noise.shape[0]
    contents = list(scene.contents)
    changed: list[int] = []
    if defect is not None:
        assert drng is not None
        full = [k for k in _PILL_INNER if _pill_role(k) in "AB"]
        empty = [k for k in _PILL_INNER if _pill_role(k) == "E"]
        if defect == "missing":
            k = full[int(drng.integers(len(full)))]
            contents[k] = "E"
            changed = [k]
        elif defect == "extra":
            k = empty[int(drng.integers(len(empty)))]
            contents[k] = "AB"[int(drng.integers(2))]
            changed = [k]
        elif defect == "misplaced":
            a = [k for k in full if contents[k] == "A"]
            b = [k for k in full if contents[k] == "B"]
            ka, kb = a[int(drng.integers(len(a)))], b[int(drng.integers(len(b)))]
            contents[ka], contents[kb] = "B", "A"
            changed = [ka, kb]
        else:  # pragma: no cover - guarded by render()
            raise ValueError(defect)

    h = scene.half
    base = np.empty((size, size, 3), dtype=np.float32)
    base[...] = scene.background
    for centre, content in zip(scene.centres, contents):
        if content == "E":
            continue
        win, sub = _pill_window(centre, h, size)
        base[win] = _blend(base[win], scene.sprites[content][sub], scene.sprite_alpha[sub])
    footprint = None
    if defect is not None:
        footprint = np.zeros((size, size), dtype=bool)
        for k in changed:
            win, sub = _pill_window(scene.centres[k], h, size)
            footprint[win] |= scene.sprite_alpha[sub] > 0
    return _finish(base, scene.gain, scene.noise), footprint


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
        "weave": (_weave_scene, _plain(_weave_draw)),
        "granite": (_granite_scene, _plain(_granite_draw)),
        "washer": (_washer_scene, _plain(_washer_draw)),
        "pillbox": (_pillbox_scene, _pillbox_draw),
    }
)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


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
