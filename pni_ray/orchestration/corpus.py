"""Scoring corpora for tests, the benchmark and demos: many cheap images, and every kind of bad file.

`write_bad_inputs` writes one file per way an input can be unusable, with the phrase its error
row must contain; `write_odd_modes` writes valid images in unusual modes that must score fine.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost no data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def _encode(rgb: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _encode_grey(grey: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grey, mode=mode).save(buf, "TIFF")
    return buf.getvalue()


def write_bad_inputs(folder: Path | str, rgb: np.ndarray, max_pixels: int = 50_000_000) -> dict[Path, str]:
    """One unusable input per kind -> {path: phrase its error must contain}.

    Some entries are paths that do not exist (a dangling symlink, a missing file): they belong in a
    list file, as a directory scan cannot find them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = _encode(rgb, "PNG")
    jpg = _encode(rgb, "JPEG", quality=90)
    side = int(max_pixels ** 0.5) + 64  # just over the pixel limit
    files: dict[str, tuple[bytes, str]] = {
        "empty.png": (b"", "empty file"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "header_only.png": (png[:33], "not a readable image"),
        "text_named.png": (b"this is a text file, not an image\n", "not a readable image"),
        "random_bytes.jpg": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                             "not a readable image"),
        "html_page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "not a readable image"),
        "bomb_over_limit.png": (png_header_only(side, side), "exceeds the limit"),
        "bomb_pil_guard.png": (png_header_only(40_000, 40_000), "1600000000 pixels exceeds the limit"),
        "zero_width.png": (png_header_only(0, 16), "not a readable image"),
        "inspection_report.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not a readable image"),
        "float_0_255.tif": (_encode_grey(rgb[..., 0].astype(np.float32), "F"), "float pixels, read as 0 (black) to 1"),
        "int32_wide.tif": (_encode_grey(rgb[..., 0].astype(np.int32) * 1000, "I"), "32-bit integer pixels, read on the"),
    }
    expected: dict[Path, str] = {}
    for name, (data, phrase) in files.items():
        (folder / name).write_bytes(data)
        expected[folder / name] = phrase
    directory = folder / "a_directory.png"
    directory.mkdir(exist_ok=True)
    expected[directory] = "directory contains no image files"
    dangling = folder / "dangling_link.png"
    if dangling.is_symlink() or dangling.exists():
        dangling.unlink()
    os.symlink(folder / "no_such_target.png", dangling)
    expected[dangling] = "broken symbolic link (its target"
    expected[folder / "missing.png"] = "file not found"
    fifo = folder / "a_fifo.png"  # opening it would wait for a writer: refused by its kind, at once
    if not fifo.exists():
        os.mkfifo(fifo)
    expected[fifo] = "not an image file but a FIFO"
    device = folder / "device_link.png"
    if not device.is_symlink():
        os.symlink("/dev/zero", device)
    expected[device] = "not an image file but a character device"
    return expected


def write_odd_modes(folder: Path | str, rgb: np.ndarray) -> list[Path]:
    """Valid images in unusual modes (CMYK, 16-bit, palette, float, 1-bit, alpha, EXIF-rotated)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb)
    gray = np.asarray(img.convert("L"))
    out: list[Path] = []

    def save(name: str, im: Image.Image, **kwargs) -> None:
        im.save(folder / name, **kwargs)
        out.append(folder / name)

    save("cmyk.jpg", img.convert("CMYK"), quality=90)
    save("gray16.png", Image.fromarray((gray.astype(np.uint16) * 257)).convert("I;16"))
    save("palette.png", img.convert("P", palette=Image.ADAPTIVE, colors=64))
    pal_t = img.convert("P", palette=Image.ADAPTIVE, colors=64)
    save("palette_transparent.png", pal_t, transparency=0)
    save("float.tif", Image.fromarray(gray.astype(np.float32) / 255.0, mode="F"))
    save("bilevel.png", img.convert("1"))
    save("gray_alpha.png", img.convert("LA"))
    save("rgba.png", img.convert("RGBA"))
    save("gray.bmp", img.convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("exif_rotated.jpg", img, exif=exif, quality=90)
    save("rgb.webp", img, quality=90)
    save("int32.tif", Image.fromarray(gray.astype(np.int32) * 257, mode="I"))  # 16-bit values in 32 bits
    return out


def make_image_corpus(sources: list[Path], folder: Path | str, n: int, seed: int = 0) -> list[Path]:
    """n distinct PNGs from a few source images: flips, rolls and gain changes (cheap, ~1 ms each)."""
    from pni_ray.data.images import load_rgb

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = [load_rgb(p) for p in sources]
    paths = []
    for i in range(n):
        rgb = base[i % len(base)]
        if rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        rgb = np.roll(rgb, int(rng.integers(-4, 5)), axis=int(rng.integers(0, 2)))
        rgb = np.clip(rgb.astype(np.int16) + int(rng.integers(-6, 7)), 0, 255).astype(np.uint8)
        sub = folder / f"{i // 250:02d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"img_{i:05d}.png"
        Image.fromarray(np.ascontiguousarray(rgb)).save(path, compress_level=1)
        paths.append(path)
    return paths
