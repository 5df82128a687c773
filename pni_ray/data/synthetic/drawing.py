"""Drawing helpers shared by the synthetic categories (float32, pixel centres at integer coordinates).

Shapes are evaluated in a local window only: defects are small and a full frame evaluation per
shape would dominate the generation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import special

FloatImage = np.ndarray  # float32, (H, W, 3), nominal range 0..255


def window(cy: float, cx: float, reach: float, size: int) -> tuple[slice, slice]:
    """Clipped square window of half-width ``reach`` around (cy, cx)."""
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, size)
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, size)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def coords(win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) of a window, float32."""
    yy, xx = np.mgrid[win[0], win[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def finish(base: FloatImage, gain: float, noise: np.ndarray) -> np.ndarray:
    """Apply global gain and per-pixel noise, quantise to uint8.

    Noise is added last and is identical for the good and defective renders,
    so only pixels whose underlying scene changed can differ.
    """
    out = base * np.float32(gain)
    out += noise
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def polyline_alpha(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (size x size) of a polyline of the given pixel width."""
    dist = np.full((size, size), np.inf, dtype=np.float32)
    half = width / 2.0
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        reach = 0.5 * float(np.hypot(y1 - y0, x1 - x0)) + half + 2.0
        win = window(0.5 * (y0 + y1), 0.5 * (x0 + x1), reach, size)
        yy, xx = coords(win)
        if yy.size == 0:
            continue
        dy, dx = y1 - y0, x1 - x0
        seg2 = dy * dy + dx * dx
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / seg2, 0.0, 1.0) if seg2 > 0 else 0.0
        d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        np.minimum(dist[win], d, out=dist[win])
    return np.clip(half + 0.5 - dist, 0.0, 1.0)


def random_walk(
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


def blob_alpha(
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
    win = window(center[0], center[1], radius * (1.0 + sum(amps)) + soft + 2.0, size)
    yy, xx = coords(win)
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


def paint(gray: np.ndarray, colour: Sequence[float]) -> FloatImage:
    """(H, W) intensity times an RGB colour -> (H, W, 3).

    Channel-wise products plus one stack are several times faster than a
    broadcast against a trailing axis of length 3.
    """
    return np.stack([gray * np.float32(c) for c in colour], axis=-1).astype(np.float32, copy=False)


def blend(base: FloatImage, colour: np.ndarray, alpha: np.ndarray) -> FloatImage:
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
NOISE_LUT = special.ndtri((np.arange(256) + 0.5) / 256.0).astype(np.float32)


def sensor_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Per-pixel sensor noise, so images are not separable by global statistics."""
    idx = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.take(NOISE_LUT * np.float32(sigma), idx)


@dataclass(frozen=True)
class Flat:
    """A noise-free scene plus the per-image gain and noise shared by both renders."""

    base: FloatImage
    gain: float
    noise: np.ndarray

