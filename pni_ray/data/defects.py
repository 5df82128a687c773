"""Synthetic defects for training PNI's refinement network.

PNI (ICCV 2023) trains its refinement network on normal images carrying
synthetic anomalies from four families: CutPaste, CutPaste-scar, DRAEM-style
Perlin-noise textures and hand-drawn-like strokes.  The refinement network
learns pixel-level targets from these, so every family returns the defect
image *and* a mask that is exactly the set of pixels whose value changed:
a mask pixel whose colour did not change would teach the network to flag
normal-looking pixels.

Every family has the signature ``(image uint8 HxWx3, rng) -> (image, mask)``
and draws all randomness from ``rng``, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pni_ray.config import DEFECT_KINDS
from pni_ray.data.images import IMAGE_EXTENSIONS, list_images, load_rgb
from pni_ray.fileio import atomic_write_json, staged_dir

__all__ = [
    "DEFECT_FAMILIES",
    "DefectMix",
    "cutpaste",
    "cutpaste_scar",
    "misplace",
    "perlin_noise",
    "perlin_texture",
    "sample_defect",
    "strokes",
    "write_defect_examples",
]

DefectFn = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# A defect whose intended region barely changed (e.g. a patch pasted onto an
# identical background) is a useless training sample: redraw it.
_MAX_TRIES = 8
_MIN_CHANGED_FRACTION = 0.8
# Pixel sizes in the papers refer to 256-px images; scale them to the input.
_REFERENCE_SIDE = 256.0
_LUMA = np.array([0.299, 0.587, 0.114])
EXAMPLES_FORMAT = "pni-ray-defect-examples"  # manifest.json of a make-defects OUT: what may be replaced


# --------------------------------------------------------------------------
# helpers


def _check_image(image: np.ndarray) -> None:
    """Fail early with a clear message instead of deep inside numpy."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("image must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image must have shape HxWx3 with H, W >= 2, got {image.shape}")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Sizes span orders of magnitude, so draw them uniformly in log space."""
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _changed(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Pixels whose value differs in any channel: the ground truth of a defect."""
    return np.any(image != out, axis=-1)


def _force_change(values: np.ndarray) -> np.ndarray:
    """Shift every channel by 48 away from the nearer bound: a guaranteed change."""
    v = values.astype(np.int16)
    return np.where(v < 128, v + 48, v - 48).astype(np.uint8)


def _retry_until_changed(
    image: np.ndarray, make: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw defects until the intended region is mostly changed.

    ``make`` returns ``(out, region)``.  If no draw changes enough of its
    region (e.g. constant images and a colour-neutral jitter), the unchanged
    pixels of the best draw are force-shifted so the mask is never empty.
    """
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(_MAX_TRIES):
        out, region = make()
        mask = region & _changed(image, out)
        n_region = int(region.sum())
        frac = mask.sum() / n_region if n_region else 0.0
        if mask.any() and frac >= _MIN_CHANGED_FRACTION:
            return out, mask
        if best is None or frac > best[2]:
            best = (out, region, frac)
    assert best is not None
    out, region, _ = best
    out = out.copy()
    if not region.any():  # generators guarantee this cannot happen; stay safe
        region = np.zeros(region.shape, bool)
        region[image.shape[0] // 2, image.shape[1] // 2] = True
    todo = region & ~_changed(image, out)
    out[todo] = _force_change(image[todo])
    return out, region & _changed(image, out)


def _color_jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast/saturation/hue jitter on (N, 3) pixels.

    CutPaste jitters the patch so the network cannot spot it by an exact
    colour match alone.  Hue is rotated about the grey axis of RGB space,
    which keeps it vectorised and avoids an HSV round trip.
    """
    x = pixels.astype(np.float64) / 255.0
    x = x * rng.uniform(0.6, 1.4)  # brightness
    mean = float((x @ _LUMA).mean())
    x = (x - mean) * rng.uniform(0.6, 1.4) + mean  # contrast
    grey = (x @ _LUMA)[:, None]
    x = grey + (x - grey) * rng.uniform(0.5, 1.5)  # saturation
    theta = rng.uniform(-0.1, 0.1) * 2.0 * math.pi  # hue
    k = np.ones(3) / math.sqrt(3.0)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = math.cos(theta) * np.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * np.outer(k, k)
    x = x @ rot.T
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade: C2-continuous, so no grid artefacts show."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    octaves: int = 1,
    persistence: float = 0.5,
) -> np.ndarray:
    """Fractal gradient (Perlin) noise of ``shape`` with ``res`` cells per axis.

    Fully vectorised; ``shape`` need not be a multiple of ``res``.  Values lie
    roughly in [-1, 1].  Extra octaves roughen blob edges as real stains are.
    """
    h, w = shape
    total = np.zeros((h, w))
    amplitude = 1.0
    norm = 0.0
    for o in range(octaves):
        ry, rx = res[0] * 2**o, res[1] * 2**o
        ys = np.arange(h) * (ry / h)
        xs = np.arange(w) * (rx / w)
        yi, xi = ys.astype(np.int64), xs.astype(np.int64)
        yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]
        angles = rng.uniform(0.0, 2.0 * math.pi, (ry + 1, rx + 1))
        gy, gx = np.sin(angles), np.cos(angles)

        def corner(dy: int, dx: int) -> np.ndarray:
            iy, ix = (yi + dy)[:, None], (xi + dx)[None, :]
            return gy[iy, ix] * (yf - dy) + gx[iy, ix] * (xf - dx)

        u, v = _fade(xf), _fade(yf)
        top = corner(0, 0) * (1 - u) + corner(0, 1) * u
        bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
        total += amplitude * math.sqrt(2.0) * (top * (1 - v) + bottom * v)
        norm += amplitude
        amplitude *= persistence
    return total / norm


# --------------------------------------------------------------------------
# defect families


def _rectangle(rng: np.random.Generator, h: int, w: int, area: tuple[float, float],
               aspect: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a rectangle whose area share and aspect (width / height) are log-uniform."""
    a = _log_uniform(rng, *area) * h * w
    r = _log_uniform(rng, *aspect)
    return int(np.clip(round(math.sqrt(a / r)), 1, h)), int(np.clip(round(math.sqrt(a * r)), 1, w))


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a colour-jittered rectangle moved elsewhere in the image.

    Area is 2-15% of the image (log-uniform, so small patches are as common
    as large ones), aspect ratio 0.3-3.3.
    """
    _check_image(image)
    h, w = image.shape[:2]

    def make() -> tuple[np.ndarray, np.ndarray]:
        ph, pw = _rectangle(rng, h, w, (0.02, 0.15), (0.3, 3.3))
        sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        dy, dx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        patch = image[sy : sy + ph, sx : sx + pw].reshape(-1, 3)
        out = image.copy()
        out[dy : dy + ph, dx : dx + pw] = _color_jitter(patch, rng).reshape(ph, pw, 3)
        region = np.zeros((h, w), bool)
        region[dy : dy + ph, dx : dx + pw] = True
        return out, region

    return _retry_until_changed(image, make)


def misplace(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A part in the wrong place: a rectangle of the image copied, unchanged, to where it does not overlap itself
    (where the image leaves room: a rectangle over half of a tiny image both ways may overlap).

    Every patch of the result is one the good image has, only elsewhere, so no
    distance to normal patches finds it and only knowing where content belongs
    does (a logical defect, as transistor's misplaced parts).  Area 1-6% of the
    image, aspect 0.5-2.  Where the copy lands on content like its own (a plain
    ground) the unchanged pixels are shifted as every family's are, so the mask
    is never empty.
    """
    _check_image(image)
    h, w = image.shape[:2]

    def make() -> tuple[np.ndarray, np.ndarray]:
        ph, pw = _rectangle(rng, h, w, (0.01, 0.06), (0.5, 2.0))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        for _ in range(_MAX_TRIES):  # a destination clear of the source (a shift by under its size is a smear)
            dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            if abs(dy - sy) >= ph or abs(dx - sx) >= pw:
                break
        else:  # unlucky draws (a rectangle of up to 6% overlaps a random place at most ~1 time in 4): the farthest
            dy = max((0, h - ph), key=lambda y: abs(y - sy))  # clear place along the axis with the most room
            dx = max((0, w - pw), key=lambda x: abs(x - sx))
            dy, dx = (dy, sx) if abs(dy - sy) / ph >= abs(dx - sx) / pw else (sy, dx)
        out = image.copy()
        out[dy : dy + ph, dx : dx + pw] = image[sy : sy + ph, sx : sx + pw]
        region = np.zeros((h, w), bool)
        region[dy : dy + ph, dx : dx + pw] = True
        return out, region

    return _retry_until_changed(image, make)


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-scar: a thin, long, rotated, colour-jittered strip.

    Width is 2-16 px and length 10-25% of the shorter side, with widths
    scaled from 256-px images to the input size.  The strip is rotated by an
    arbitrary angle and the mask follows the rotated strip exactly (pixels
    are gathered by inverse mapping with nearest-neighbour sampling).
    """
    _check_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    scale = side / _REFERENCE_SIDE

    def make() -> tuple[np.ndarray, np.ndarray]:
        length = max(2.0, rng.uniform(0.10, 0.25) * side)
        width = float(np.clip(_log_uniform(rng, 2.0, 16.0) * scale, 1.0, length))
        angle = rng.uniform(0.0, math.pi)
        c, s = math.cos(angle), math.sin(angle)
        # half extents of the rotated strip's bounding box
        hx = abs(c) * length / 2 + abs(s) * width / 2
        hy = abs(s) * length / 2 + abs(c) * width / 2
        cy = int(rng.integers(int(min(hy, (h - 1) / 2)), h - int(min(hy, (h - 1) / 2))))
        cx = int(rng.integers(int(min(hx, (w - 1) / 2)), w - int(min(hx, (w - 1) / 2))))
        # source strip is axis-aligned along x
        scy = rng.uniform(min(width / 2, h / 2), max(h - width / 2, h / 2))
        scx = rng.uniform(min(length / 2, w / 2), max(w - length / 2, w / 2))
        y0, y1 = max(0, int(cy - hy) - 1), min(h, int(cy + hy) + 2)
        x0, x1 = max(0, int(cx - hx) - 1), min(w, int(cx + hx) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        ddy, ddx = yy - cy, xx - cx
        along = ddx * c + ddy * s
        across = -ddx * s + ddy * c
        inside = (np.abs(along) < length / 2) & (np.abs(across) < width / 2)
        src_y = np.clip(np.rint(scy + across[inside]), 0, h - 1).astype(np.int64)
        src_x = np.clip(np.rint(scx + along[inside]), 0, w - 1).astype(np.int64)
        region = np.zeros((h, w), bool)
        region[y0:y1, x0:x1] = inside
        out = image.copy()
        out[region] = _color_jitter(image[src_y, src_x], rng)
        return out, region

    return _retry_until_changed(image, make)


def _make_texture(
    h: int, w: int, image: np.ndarray, rng: np.random.Generator, texture_source: np.ndarray | None
) -> np.ndarray:
    """A foreign texture for Perlin blobs, float HxWx3 in [0, 255].

    With ``texture_source`` (e.g. a DTD image, as in DRAEM) a random crop is
    resized to the image; otherwise a random generated texture is used:
    two-colour fractal noise, noisy flat colour, or a jittered, flipped copy
    of the image itself.
    """
    if texture_source is not None:
        src = np.asarray(texture_source)
        if src.ndim == 2:
            src = np.stack([src] * 3, axis=-1)
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise ValueError("texture_source must be a uint8 HxW or HxWx3 array")
        th, tw = src.shape[:2]
        crop = max(1, int(rng.uniform(0.25, 1.0) * min(th, tw)))
        y, x = rng.integers(0, th - crop + 1), rng.integers(0, tw - crop + 1)
        piece = Image.fromarray(np.ascontiguousarray(src[y : y + crop, x : x + crop]))
        piece = piece.rotate(90 * int(rng.integers(0, 4)), expand=True)
        return np.asarray(piece.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        res = (int(2 ** rng.integers(1, 5)), int(2 ** rng.integers(1, 5)))
        t = perlin_noise((h, w), res, rng, octaves=3)
        t = ((t - t.min()) / max(t.max() - t.min(), 1e-9))[..., None]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        return c0 * (1 - t) + c1 * t
    if kind == 1:
        colour = rng.uniform(0, 255, 3)
        return np.clip(colour + rng.normal(0, rng.uniform(2, 30), (h, w, 3)), 0, 255)
    flipped = image[::-1, ::-1] if rng.random() < 0.5 else image[::-1]
    return _color_jitter(flipped.reshape(-1, 3), rng).reshape(h, w, 3).astype(np.float64)


def perlin_texture(
    image: np.ndarray, rng: np.random.Generator, texture_source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style defect: Perlin-noise blobs filled with a foreign texture.

    The blob area is 0.1-40% of the image (log-uniform, from specks to large
    stains), set by thresholding fractal Perlin noise at the matching
    quantile; the texture is blended in with opacity beta in [0.1, 1.0].
    """
    _check_image(image)
    h, w = image.shape[:2]

    def make() -> tuple[np.ndarray, np.ndarray]:
        # blob scale varies 16x; anisotropy is capped at 4x so blobs stay blob-like
        a = int(rng.integers(0, 5))
        b = int(np.clip(a + rng.integers(-2, 3), 0, 4))
        res = (2**a, 2**b) if rng.random() < 0.5 else (2**b, 2**a)
        noise = perlin_noise((h, w), res, rng, octaves=2).ravel()
        k = max(1, int(round(_log_uniform(rng, 0.001, 0.4) * h * w)))
        threshold = np.partition(noise, noise.size - k)[noise.size - k]
        region = (noise >= threshold).reshape(h, w)
        texture = _make_texture(h, w, image, rng, texture_source)
        beta = rng.uniform(0.1, 1.0)
        out = image.copy()
        blended = (1 - beta) * image[region].astype(np.float64) + beta * texture[region]
        out[region] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out, region

    return _retry_until_changed(image, make)


def _bezier(points: np.ndarray, n: int) -> np.ndarray:
    """Points on a cubic Bezier curve: smooth like a pen stroke."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = points
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def strokes(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hand-drawn-like strokes: 1-4 Bezier curves of random colour and opacity.

    Widths are 1-12 px (scaled from 256-px images) and stroke extents
    5-70% of the shorter side.  Strokes are rasterised without antialiasing
    so every pixel is either fully in a stroke or not, keeping the mask exact.
    """
    _check_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    scale = side / _REFERENCE_SIDE

    def make() -> tuple[np.ndarray, np.ndarray]:
        out = image.astype(np.float64)
        region = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 5))):
            extent = _log_uniform(rng, 0.05, 0.7) * side
            centre = np.array([rng.uniform(0, w), rng.uniform(0, h)])
            ctrl = centre + rng.uniform(-extent / 2, extent / 2, (4, 2))
            pts = _bezier(ctrl, 64)
            width = max(1, int(round(_log_uniform(rng, 1.0, 12.0) * scale)))
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
            stroke = np.asarray(canvas) > 0
            if not stroke.any():  # curve fell outside the image: put a dot at its clipped start
                y, x = int(np.clip(pts[0, 1], 0, h - 1)), int(np.clip(pts[0, 0], 0, w - 1))
                stroke[y, x] = True
            colour = rng.uniform(0, 255, 3)
            alpha = rng.uniform(0.4, 1.0)
            out[stroke] = (1 - alpha) * out[stroke] + alpha * colour
            region |= stroke
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), region

    return _retry_until_changed(image, make)


DEFECT_FAMILIES: dict[str, DefectFn] = {
    "cutpaste": cutpaste,
    "cutpaste_scar": cutpaste_scar,
    "perlin": perlin_texture,
    "strokes": strokes,
}


# --------------------------------------------------------------------------
# mixing


@dataclass(frozen=True)
class DefectMix:
    """Relative frequency of each family plus a chance of a defect-free sample.

    Weights are validated at construction so a typo in a config fails at
    start-up rather than silently never drawing a family.
    """

    weights: dict[str, float] = field(default_factory=lambda: {kind: 1 for kind in DEFECT_KINDS})
    p_normal: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(DEFECT_FAMILIES))
        if unknown:
            raise ValueError(
                f"unknown defect families {unknown}; known: {sorted(DEFECT_FAMILIES)}"
            )
        bad = sorted(k for k, v in self.weights.items() if not (float(v) >= 0 and math.isfinite(float(v))))
        if bad:
            raise ValueError(f"defect weights must be finite and >= 0, got bad weights for {bad}")
        if sum(float(v) for v in self.weights.values()) <= 0:
            raise ValueError(f"defect weights must have a positive total, got {dict(self.weights)}")
        if not 0.0 <= self.p_normal <= 1.0:
            raise ValueError(f"p_normal must be in [0, 1], got {self.p_normal}")


def sample_defect(
    image: np.ndarray,
    rng: np.random.Generator,
    mix: DefectMix = DefectMix(),
    *,
    texture_source: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Draw one training sample: (image, mask, family name or "normal").

    ``texture_source`` is passed to the Perlin family (DRAEM uses DTD images).
    """
    _check_image(image)
    if mix.p_normal > 0 and rng.random() < mix.p_normal:
        return image.copy(), np.zeros(image.shape[:2], bool), "normal"
    names = [n for n in DEFECT_FAMILIES if float(mix.weights.get(n, 0)) > 0]
    p = np.array([float(mix.weights[n]) for n in names])
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    if name == "perlin":
        out, mask = perlin_texture(image, rng, texture_source)
    else:
        out, mask = DEFECT_FAMILIES[name](image, rng)
    return out, mask, name


# --------------------------------------------------------------------------
# previews


def _thumbnail_with_outline(image: np.ndarray, mask: np.ndarray, size: int) -> Image.Image:
    """Downscaled image with the mask outlined in red, tiny defects kept visible."""
    h, w = mask.shape
    f = size / max(h, w)
    tw, th = max(1, round(w * f)), max(1, round(h * f))
    thumb = np.array(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR))
    # BOX downscaling keeps any partially covered thumbnail pixel, so specks survive
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.Resampling.BOX)) > 0
    # outline drawn just outside the mask so thin defects stay visible inside it
    outline = ndimage.binary_dilation(m) & ~m
    thumb[outline] = (255, 0, 0)
    return Image.fromarray(thumb)


def write_defect_examples(
    image_dir: Path,
    out: Path,
    kinds: Sequence[str] | None = None,
    n_per_kind: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Write example defects and an overview sheet, to eyeball each family.

    For each kind, ``n_per_kind`` examples are made, cycling through the
    sorted images of ``image_dir``; example ``i`` of image ``stem`` goes to
    ``out/<kind>/<stem>_<i>.png`` with its mask in ``<stem>_<i>_mask.png``.
    ``out/overview.png`` has one row per kind showing mask outlines in red, and
    ``out/manifest.json`` marks the folder as this function's, which a rerun replaces whole
    (any other non-empty folder is refused). Returns the images and masks, overview last.
    """
    image_dir, out = Path(image_dir), Path(out)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {image_dir}")
    kinds = list(DEFECT_FAMILIES) if kinds is None else list(dict.fromkeys(kinds))  # --kind x --kind x: once
    unknown = sorted(set(kinds) - set(DEFECT_FAMILIES))
    if unknown:
        raise ValueError(f"unknown defect kinds {unknown}; known: {sorted(DEFECT_FAMILIES)}")
    if not kinds:
        raise ValueError("kinds must not be empty")
    if n_per_kind < 1:
        raise ValueError(f"n_per_kind must be >= 1, got {n_per_kind}")
    paths = list_images(image_dir)  # the extensions training reads
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")

    family_index = {name: i for i, name in enumerate(DEFECT_FAMILIES)}
    cache: dict[Path, np.ndarray] = {}
    names: list[str] = []
    thumbs: list[list[Image.Image]] = []
    cell = 192
    # staged: a failure (a bad image) leaves no half-written OUT, and a rerun replaces the last one whole
    with staged_dir(out, EXAMPLES_FORMAT, "defect examples") as tmp:
        for kind in kinds:
            (tmp / kind).mkdir()
            row: list[Image.Image] = []
            for i in range(n_per_kind):
                p = paths[i % len(paths)]
                if p not in cache:
                    cache[p] = load_rgb(p)  # as training reads it; a bad file is an ImageError naming it
                # independent stream per (kind, example): stable under changes to kinds
                rng = np.random.default_rng([seed, family_index[kind], i])
                img, mask = DEFECT_FAMILIES[kind](cache[p], rng)
                img_name, mask_name = f"{kind}/{p.stem}_{i}.png", f"{kind}/{p.stem}_{i}_mask.png"
                Image.fromarray(img).save(tmp / img_name)
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / mask_name)
                names += [img_name, mask_name]
                row.append(_thumbnail_with_outline(img, mask, cell))
            thumbs.append(row)

        label_w, pad = 110, 4
        sheet = Image.new("RGB", (label_w + n_per_kind * (cell + pad), len(kinds) * (cell + pad)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, (kind, row) in enumerate(zip(kinds, thumbs)):
            y = r * (cell + pad)
            draw.text((4, y + cell // 2), kind, fill="black")
            for c, t in enumerate(row):
                sheet.paste(t, (label_w + c * (cell + pad), y))
        sheet.save(tmp / "overview.png")
        names.append("overview.png")
        atomic_write_json(tmp / "manifest.json", {"format": EXAMPLES_FORMAT, "image_dir": str(image_dir),
                                                  "kinds": kinds, "n_per_kind": n_per_kind, "seed": seed})
    return [out / name for name in names]
