"""Texture categories: ``weave`` (periodic) and ``granite`` (stochastic)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from pni_ray.data.synthetic.drawing import Flat, blend, blob_alpha, finish, polyline_alpha, random_walk, sensor_noise


def _thread_profile(frac: np.ndarray, coverage: float = 0.8) -> np.ndarray:
    """Cylindrical brightness across a thread; 0 in the gap between threads."""
    t = np.abs(frac - 0.5) * np.float32(2.0 / coverage)
    return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


def weave_scene(rng: np.random.Generator, size: int) -> Flat:
    """Plain over-under weave with per-image phase, colour and yarn jitter."""
    period = size / 16.0
    phase = rng.uniform(0.0, period, 2)
    warp = np.array([176.0, 144.0, 102.0]) + rng.normal(0.0, 3.0, 3)
    weft = warp * np.array([0.94, 0.95, 1.0]) + rng.normal(0.0, 2.0, 3)
    backing = np.array([40.0, 33.0, 26.0], dtype=np.float32)
    n_threads = int(np.ceil(size / period)) + 3
    yarn = (1.0 + rng.normal(0.0, 0.035, (2, n_threads))).astype(np.float32)
    gain = float(rng.uniform(0.93, 1.07))
    noise = sensor_noise(rng, size, 4.0)

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
    return Flat(base.astype(np.float32, copy=False), gain, noise)


def weave_draw(
    scene: Flat, defect: Optional[str], drng: Optional[np.random.Generator]
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
            alpha = polyline_alpha(np.stack([centre - offs, centre + offs]), width, size)
            base = blend(base, np.array([246.0, 242.0, 232.0]), alpha)
        elif defect == "hole":
            radius = drng.uniform(0.035, 0.065) * size
            alpha = blob_alpha(drng, centre, radius, size, soft=1.0, roughness=0.25)
            base = blend(base, np.array([18.0, 15.0, 13.0]), alpha)
        elif defect == "color":
            radius = drng.uniform(0.06, 0.1) * size
            tints = np.array([[0.85, 0.42, 0.45], [0.5, 0.58, 0.95], [0.62, 0.85, 0.5]])
            tint = tints[drng.integers(len(tints))].astype(np.float32)
            alpha = 0.85 * blob_alpha(
                drng, centre, radius, size, soft=0.15 * radius, roughness=0.2, cutoff=0.2
            )
            base = blend(base, base * tint, alpha)
        else:  # pragma: no cover - guarded by render()
            raise ValueError(defect)
    return finish(base, scene.gain, scene.noise)



def _unit(a: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-std field, so contrast does not depend on the image size."""
    a = a - a.mean()
    return (a / (a.std() + 1e-8)).astype(np.float32)


def granite_scene(rng: np.random.Generator, size: int) -> Flat:
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
    noise = sensor_noise(rng, size, 4.0)
    return Flat(base, gain, noise)


def granite_draw(
    scene: Flat, defect: Optional[str], drng: Optional[np.random.Generator]
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
            path = random_walk(drng, centre, angle, length, 18, 0.35)
            paths = [path]
            if drng.random() < 0.6:  # a side branch, as real cracks often have
                j = int(drng.integers(4, 14))
                turn = float(drng.choice([-1.0, 1.0])) * 0.9
                paths.append(random_walk(drng, path[j], angle + turn, 0.4 * length, 8, 0.35))
            # Centre the whole crack on ``centre`` so it stays inside the image.
            pts = np.concatenate(paths)
            offset = centre - 0.5 * (pts.min(axis=0) + pts.max(axis=0))
            alpha = polyline_alpha(paths[0] + offset, width, size)
            if len(paths) > 1:
                alpha = np.maximum(alpha, polyline_alpha(paths[1] + offset, 0.8 * width, size))
            base = blend(base, np.array([26.0, 22.0, 22.0]), alpha)
        elif defect == "stain":
            radius = drng.uniform(0.07, 0.11) * size
            tints = np.array([[1.12, 0.74, 0.42], [0.78, 0.55, 0.4]])  # rust, brown oil
            tint = tints[drng.integers(len(tints))].astype(np.float32)
            alpha = 0.9 * blob_alpha(
                drng, centre, radius, size, soft=0.2 * radius, roughness=0.25, cutoff=0.2
            )
            base = blend(base, base * tint, alpha)
        else:  # pragma: no cover - guarded by render()
            raise ValueError(defect)
    return finish(base, scene.gain, scene.noise)
