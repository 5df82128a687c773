"""The ``washer`` category: a centred object with a fixed pose (a machined metal ring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pni_ray.data.synthetic.drawing import (FloatImage, blend, blob_alpha, finish, paint, polyline_alpha, random_walk,
                                            sensor_noise)


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


def washer_scene(rng: np.random.Generator, size: int) -> _WasherScene:
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
    noise = sensor_noise(rng, size, 3.0)

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
    lighting = paint(1.0 + np.float32(grad_amp / size) * g_x, (1.0, 1.0, 1.0))
    good_base = _washer_compose(bg_col, metal_col, shade, alpha)
    return _WasherScene(
        bg_col, metal_col, shade, alpha, lighting, good_base,
        (float(cy), float(cx)), r_in, r_out, gain, noise,
    )


def washer_draw(
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
            chip = blob_alpha(drng, centre, bite, size, soft=1.0, roughness=0.3)
            chipped = scene.alpha * (1.0 - chip)
            base = _washer_compose(scene.bg_col, scene.metal_col, scene.shade, chipped)
        else:
            rad = drng.uniform(r_in + 0.2 * (r_out - r_in), r_out - 0.2 * (r_out - r_in))
            centre = np.array([cy + rad * np.sin(ang), cx + rad * np.cos(ang)])
            if defect == "crack":
                heading = ang + drng.normal(0.0, 0.4) + (np.pi if drng.random() < 0.5 else 0.0)
                length = drng.uniform(0.12, 0.2) * size
                start = centre - 0.5 * length * np.array([np.sin(heading), np.cos(heading)])
                path = random_walk(drng, start, heading, length, 12, 0.3)
                width = max(1.0, size / 170.0) * drng.uniform(1.0, 1.3)
                crack = polyline_alpha(path, width, size) * scene.alpha
                base = blend(base, np.array([30.0, 29.0, 30.0]), crack)
            elif defect == "contamination":
                spots = np.zeros((size, size), dtype=np.float32)
                for _ in range(int(drng.integers(1, 4))):
                    c = centre + drng.normal(0.0, 0.03 * size, 2)
                    r = drng.uniform(0.02, 0.045) * size
                    blob = blob_alpha(drng, c, r, size, soft=0.25 * r, roughness=0.3, cutoff=0.2)
                    spots = np.maximum(spots, blob)
                spots = 0.9 * spots * scene.alpha
                base = blend(base, base * np.array([0.62, 0.45, 0.26], dtype=np.float32), spots)
            else:  # pragma: no cover - guarded by render()
                raise ValueError(defect)
    return finish(base * scene.lighting, scene.gain, scene.noise)
