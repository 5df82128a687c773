"""Image decoding that turns any file a camera or a colleague produces into RGB, or says why not."""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pni_ray.fileio import not_regular

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that show the stored image turned by 90 degrees
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: above every industrial sensor we target, below bombs
TOO_BIG_HINT = ("decompression-bomb guard; if the image is genuine, raise the limit: --max-pixels N for `pni-ray score` "
                "(max_pixels in the nightly config), geometry.max_pixels in the training config for train and evaluate")
_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-global


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the problem."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to size (square int or (h, w)) with PIL's bilinear filter (torch-free)."""
    h, w = (size, size) if isinstance(size, int) else size
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def is_grey(rgb: np.ndarray) -> bool:
    """Whether an (H, W, 3) image's three channels are equal at every pixel: a grey camera's frame, read as RGB as
    `to_rgb` reads every grey mode. Resizing keeps it, so a canvas says it as its image does."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def list_images(folder: Path) -> list[Path]:
    """The image files in `folder`, and its broken links, FIFOs and devices named like image files: the reader names
    those ("broken symbolic link", "not an image file but a FIFO"), where leaving them out would train or evaluate on
    fewer images without a word; sub-folders, not read, are warned of."""
    entries, inside = [], []
    for p in folder.iterdir():  # a FIFO or device named like an image is kept: the reader refuses it, naming it
        (inside if p.is_dir() else entries).append(p)
    folders = sorted(p.name for p in inside if not p.name.startswith("."))
    if folders:  # a day's images moved into a sub-folder would otherwise be left out without a word
        warn_once("sub-folders", folder, "%s: %d sub-folder(s) not read (images are read from this folder itself, not "
                  "from folders inside it): %s%s", len(folders), ", ".join(folders[:5]), ", ..." if len(folders) > 5 else "")
    skipped = sorted(p.name for p in entries if not is_image_file(p) and not p.name.startswith(".")
                     and p.name not in ("Thumbs.db", "desktop.ini"))
    if skipped:
        warn_once("not images", folder, "%s: %d file(s) not read, their extensions not an image's (%s): %s%s", len(skipped),
                  ", ".join(IMAGE_EXTENSIONS), ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    return sorted(p for p in entries if is_image_file(p))


@contextmanager
def _pillow_allows(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice it, made
    in Image.open) must not be stricter than ours, or a raised --max-pixels could never take effect:
    for this open its limit is at least ours, then restored. Ours is checked on the header's size."""
    with _PILLOW_LIMIT:
        before = Image.MAX_IMAGE_PIXELS
        if before is not None and before < max_pixels:
            Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _open(path: Path, max_pixels: int) -> Image.Image:
    try:
        st = path.stat()
        kind = not_regular(st.st_mode)
        if kind is not None:
            raise ImageError(f"{path}: not an image file but {kind}")
        if st.st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings(), _pillow_allows(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            img = Image.open(path)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        if path.is_symlink():  # `ls` shows it: say why it cannot be read
            raise ImageError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)") from exc
        raise ImageError(f"{path}: file not found") from exc
    except Image.DecompressionBombError as exc:  # above twice Pillow's limit, so above ours too
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(f"{path}: {size.group(1) + ' pixels' if size else 'an image size that'} exceeds the limit "
                         f"of {max_pixels} ({TOO_BIG_HINT})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc})") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} ({TOO_BIG_HINT})")
    if w == 0 or h == 0:
        raise ImageError(f"{path}: image has zero size {w}x{h}")
    return img


_WARNED: set[tuple[str, str]] = set()


def warn_anew() -> None:
    """Each file's warnings (and the once-per-process few-bits one) are said again from here: a process that runs
    several jobs, as a Ray worker runs train-all's pairs one after another, gives each job its own warnings."""
    _WARNED.clear()
    _FEW_BITS_SAID.clear()


def warn_once(what: str, path: Path | str, message: str, *args: object) -> None:
    """A warning about one file's `what`, logged the first time only: a file is read several times in a
    run (layout check, features, calibration), and one line per file is what a user needs."""
    if (what, str(path)) not in _WARNED:
        _WARNED.add((what, str(path)))
        log.warning(message, path, *args)


def _exif_unreadable(path: Path, exc: SyntaxError) -> None:
    warn_once("exif", path, "%s: its EXIF block is not readable (%s): the image is read as stored, its orientation "
              "tag (if any) ignored", exc)


def upright(img: Image.Image, path: Path) -> Image.Image:
    """The image turned as its EXIF orientation says; as stored where its EXIF block cannot be parsed
    (Pillow's SyntaxError: not TIFF data), since the pixels themselves are fine."""
    try:
        return ImageOps.exif_transpose(img)
    except SyntaxError as exc:
        _exif_unreadable(path, exc)
        return img


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, after EXIF orientation, without decoding pixels."""
    return _upright_size(_open(Path(path), max_pixels), Path(path))


def _upright_size(img: Image.Image, path: Path) -> tuple[int, int]:
    return (img.height, img.width) if _orientation(img, path) in QUARTER_TURNS else img.size


def _orientation(img: Image.Image, path: Path) -> int:
    try:  # a PNG's EXIF chunk may follow its pixels: reading it reads the whole file
        return img.getexif().get(0x0112, 1)
    except SyntaxError as exc:
        _exif_unreadable(path, exc)
        return 1
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image data ({exc.__class__.__name__}: {exc})") from exc


def quarter_turned(path: Path | str) -> bool:
    """Whether the image's EXIF orientation shows it turned a quarter (its upright size is its stored one transposed)."""
    return _orientation(_open(Path(path), DEFAULT_MAX_PIXELS), Path(path)) in QUARTER_TURNS


# Wide grey modes -> the value range read as black..white. Fixed per mode, never the image's own min and max:
# a per-image stretch erases exposure (a dark frame reads as a normal one) and lets one hot pixel rescale the
# whole image. "I" is 32-bit: what Pillow < 10.3 opens 16-bit PNGs as, and some TIFF writers give 16-bit
# data; it is read on the 16-bit scale, and values beyond it have no standard range and are refused.
WIDE_MODE_RANGES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def check_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, white_level: int | None = None) -> tuple[int, int]:
    """(width, height) as `image_size` gives it, once the pixels decode and lie on their mode's scale: a
    truncated JPEG's header reads fine, and so does an out-of-range float TIFF's, so only decoding finds
    them, here, before minutes of training rather than in the middle of them. One decode: a PNG's EXIF
    read already loads its pixels where the chunk follows them; a JPEG decodes at 1/8 scale, which still
    reads all of its data."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        size = _upright_size(img, path)
        try:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated data, bad codecs: all name the file
            raise ImageError(f"{path}: corrupt or truncated image data ({exc.__class__.__name__}: {exc})") from exc
        if img.mode in WIDE_MODE_RANGES:
            wide_grey(img, path, white_level)
    finally:
        img.close()
    return size


def to_rgb(img: Image.Image, path: Path | str = "image", white_level: int | None = None) -> Image.Image:
    """Any PIL mode (upright already) -> RGB: wide grey on its fixed scale (`wide_grey`), alpha
    composited over black."""
    if img.mode in WIDE_MODE_RANGES:
        return Image.fromarray(wide_grey(img, path, white_level), mode="L").convert("RGB")
    return over_black(img).convert("RGB")


def wide_grey(img: Image.Image, path: Path | str, white_level: int | None = None) -> np.ndarray:
    """16-bit grey over 0..65535, 32-bit integer grey on the same scale and float grey over 0..1 (WIDE_MODE_RANGES)
    -> uint8; integer grey over 0..white_level instead where a model was trained with one (a 12-bit camera's 4095,
    geometry.white_level). A float image outside 0..1 (beyond float32 rounding), an integer one above its white, or
    one holding NaN or infinity is refused, naming `path`, its range and what to write instead."""
    arr = np.asarray(img, dtype=np.float64)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ImageError(f"{path}: {bad} of {arr.size} pixels are NaN or infinite (a float image): write the "
                         "image again with finite values")
    scaled = white_level is not None and img.mode != "F"
    top = float(white_level) if scaled else WIDE_MODE_RANGES[img.mode]
    slack = 1e-6 if img.mode == "F" else 0.0  # 1 +- a few ulp from a float pipeline's rescale is still 1
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -slack or hi > top + slack:
        if scaled and lo < 0:
            raise ImageError(f"{path}: integer grey pixels from {lo!r} to {hi!r}: below 0 (black), which no camera "
                             "writes; write the image again as 8- or 16-bit")
        if scaled:
            raise ImageError(f"{path}: integer grey pixels from {lo!r} to {hi!r}, above the model's white level "
                             f"{white_level} (geometry.white_level, read as white): the images hold more bits than the "
                             "model was trained on; train with the white level of these images")
        if img.mode == "F":
            kind, fix = "float pixels, read as 0 (black) to 1 (white)", "scale it to 0..1"
        else:
            kind, fix = "32-bit integer pixels, read on the 16-bit scale (0 to 65535)", "write it as 8- or 16-bit"
        raise ImageError(f"{path}: {kind}, range from {lo!r} to {hi!r}: {fix}, so every image of the line is "
                         "read on one scale")
    if not scaled and top == 65535.0 and 0 < hi < 4096:
        _few_bits(path, hi)
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


_FEW_BITS_SAID = threading.Event()


def _few_bits(path: Path | str, top: float, colour: bool = False) -> None:
    """Once per process: a camera's 10- or 12-bit data written unshifted into 16-bit files reads almost black on the
    16-bit scale, keeping 1/16 of its grey levels or fewer; every image of such a line would say it."""
    if not _FEW_BITS_SAID.is_set():
        _FEW_BITS_SAID.set()
        if colour:  # --white-level reads grey only: colour must come as 8 bits, or scaled to the full 16
            log.warning("%s: 16-bit colour pixels no brighter than about %d (12 bits or fewer): read from their high "
                        "bytes, this image keeps at most 16 levels per channel and is nearly black. Write the camera's "
                        "colour images with 8 bits per channel, or scale them to the full 16 bits (--white-level applies "
                        "to grey images only; said once per process)", path, int(top))
            return
        log.warning("%s: 16-bit or 32-bit grey pixels no brighter than %d (12 bits or fewer): read over 0..65535 this "
                    "image keeps at most 16 grey levels. If the camera writes 10- or 12-bit data unshifted, train "
                    "with --white-level 4095 (1023 for 10-bit; geometry.white_level in a config): the model then reads "
                    "every image on that scale (said once per process)", path, int(top))


def over_black(img: Image.Image) -> Image.Image:
    """An image with an alpha channel (or a transparent palette colour) composited over black, as a viewer on a
    dark background shows it; any other image unchanged."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA"):
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)


def load_rgb(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, white_level: int | None = None) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB with EXIF orientation applied, or raise ImageError. `white_level`: the
    model's 16-bit white (`wide_grey`)."""
    path = Path(path)
    img = _open(path, max_pixels)
    if img.format == "TIFF" and getattr(img, "n_frames", 1) > 1:  # (a camera JPEG's MPO preview is no page)
        warn_once("frames", path, "%s: %d pages or frames; only the first is read", img.n_frames)
    sixteen_bit_colour = _sixteen_bit_colour(img)  # read from its tile, which loading clears
    try:
        img.load()
        rgb = to_rgb(upright(img, path), path, white_level)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated data, bad codecs: all name the file
        raise ImageError(f"{path}: corrupt or truncated image data ({exc.__class__.__name__}: {exc})") from exc
    out = np.asarray(rgb, dtype=np.uint8).copy()
    if sixteen_bit_colour and 0 < int(out.max()) < 16:  # 16-bit colour whose values stay below 4096
        _few_bits(path, 4095, colour=True)
    return out


def _sixteen_bit_colour(img: Image.Image) -> bool:
    """Whether Pillow decodes this image from 16 bits per colour channel ('RGB;16B', 'RGB;16L' ...): it keeps
    each sample's high byte, so 12-bit data stored unshifted reads almost black."""
    rawmode = ""
    if img.tile:
        args = img.tile[0][3] if len(img.tile[0]) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
    return img.mode in ("RGB", "RGBA") and ";16" in str(rawmode)


def load_mask(path: Path | str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Binary ground-truth mask (H, W) bool: defect where the grey value is above 127, or, in a mask
    whose values all lie at or below 127, wherever it is not 0.

    MVTec AD's masks are 0 / 255 (cut at 127, as it always was); masks saved as 0 / 1, instance masks
    0..k (VisA), or palettes whose defect colours are dark once grey (red: 76) would read as empty, or
    lose some defects, under a fixed 127 and silently drop pixels from pixel AUROC and AUPRO. A mask with
    transparency is read over black: editors save white strokes on a transparent layer, whose hidden
    colour would otherwise mark every pixel."""
    path = Path(path)
    img = _open(path, DEFAULT_MAX_PIXELS)
    try:
        arr = np.asarray(over_black(upright(img, path)).convert("L"))
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{path}: corrupt mask ({exc})") from exc
    if expected_hw is not None and arr.shape != tuple(expected_hw):
        raise ImageError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its image is {expected_hw[1]}x{expected_hw[0]}"
        )
    top = int(arr.max()) if arr.size else 0
    return arr > 127 if top > 127 else arr > 0


def to_float(canvases: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1]: the model input, torch or not."""
    x = np.asarray(canvases).astype(np.float32) / 255.0
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
