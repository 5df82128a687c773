"""The ``pillbox`` category: logical defects only (a tablet missing, two swapped, one extra)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np

from pni_ray.data.synthetic.drawing import FloatImage, blend, finish, sensor_noise

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


def pillbox_scene(rng: np.random.Generator, size: int) -> _PillScene:
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
    noise = sensor_noise(rng, size, 3.0)
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


def pillbox_draw(
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
        base[win] = blend(base[win], scene.sprites[content][sub], scene.sprite_alpha[sub])
    footprint = None
    if defect is not None:
        footprint = np.zeros((size, size), dtype=bool)
        for k in changed:
            win, sub = _pill_window(scene.centres[k], h, size)
            footprint[win] |= scene.sprite_alpha[sub] > 0
    return finish(base, scene.gain, scene.noise), footprint
