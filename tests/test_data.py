"""MVTec layout validation and image decoding: every failure names the file and the problem."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pni_ray.data.images import ImageError, load_mask, load_rgb
from pni_ray.data.mvtec import LayoutError, list_categories, load_category


def _png(path: Path, size=(32, 32), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _category(root: Path, name="cat", n_train=3) -> Path:
    base = root / name
    for i in range(n_train):
        _png(base / "train" / "good" / f"{i:03d}.png")
    _png(base / "test" / "good" / "000.png")
    _png(base / "test" / "scratch" / "000.png")
    _png(base / "ground_truth" / "scratch" / "000_mask.png", mode="L", value=255)
    return base


def test_valid_layout(tmp_path):
    _category(tmp_path)
    cat = load_category(tmp_path, "cat")
    assert len(cat.train) == 3
    assert [(s.defect_type, s.label) for s in cat.test] == [("good", 0), ("scratch", 1)]
    assert cat.has_test
    assert list_categories(tmp_path) == ["cat"]


def test_no_train_images(tmp_path):
    base = _category(tmp_path, n_train=0)
    (base / "train" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError, match="has no train images") as err:
        load_category(tmp_path, "cat")
    assert str(base / "train" / "good") in str(err.value)


def test_missing_category_and_train_dir(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        load_category(tmp_path, "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(LayoutError, match="train/good"):
        load_category(tmp_path, "bare")


def test_good_folders_in_another_case_are_named(tmp_path):
    """test/Good was read as a defect type (its good images then demanded masks, and --image-only counted them as
    defects); train/Good only as "train/good is missing"."""
    base = _category(tmp_path)
    (base / "test" / "good").rename(base / "test" / "Good")
    (base / "train" / "good").rename(base / "train" / "Good")
    with pytest.raises(LayoutError) as err:
        load_category(tmp_path, "cat")
    message = str(err.value)
    assert f"{base / 'test' / 'Good'}: good test images go in test/good/" in message
    assert f"found {base / 'train' / 'Good'}: rename it good" in message
    assert "defect image without a mask" not in message
    with pytest.raises(LayoutError, match="good test images go in test/good/"):
        load_category(tmp_path, "cat", with_masks=False, with_train=False)


@pytest.mark.parametrize("what", ["folder", "broken link"])
def test_a_mask_that_is_no_file_is_named_as_what_it_is(tmp_path, caplog, what):
    """A folder or a broken link at a mask's path was called "mask without a test image" (the image is there) and
    "defect image without a mask (expected PATH)" (PATH is there)."""
    import logging

    base = _category(tmp_path)
    mask = base / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    if what == "folder":
        mask.mkdir()
    else:
        mask.symlink_to(tmp_path / "gone.png")
    with caplog.at_level(logging.WARNING), pytest.raises(LayoutError) as err:
        load_category(tmp_path, "cat")
    said = {"folder": "which is a folder", "broken link": f"which is a broken symbolic link (to {tmp_path / 'gone.png'})"}
    assert said[what] in str(err.value)
    assert "mask without a test image" not in caplog.text


def test_masks_of_good_images_are_no_orphans(tmp_path, caplog):
    import logging

    base = _category(tmp_path)
    _png(base / "ground_truth" / "good" / "000_mask.png", mode="L", value=255)
    with caplog.at_level(logging.WARNING):
        cat = load_category(tmp_path, "cat")
    assert len(cat.test) == 2 and "mask without a test image" not in caplog.text


def test_defect_without_mask(tmp_path):
    base = _category(tmp_path)
    _png(base / "test" / "crack" / "007.png")
    with pytest.raises(LayoutError, match="defect image without a mask") as err:
        load_category(tmp_path, "cat")
    assert "007.png" in str(err.value) and "ground_truth/crack/007_mask.png" in str(err.value)


def test_layout_check_names_what_it_used_to_drop_or_misread(tmp_path, caplog):
    """A broken link and a truncated JPEG in train/good are layout problems, found before training (the
    link was left out silently, the JPEG failed mid-fit); a mask without its image is warned of; a hidden
    folder under test/ is no defect type; a `_mask.PNG` is the mask of its image."""
    import os

    base = _category(tmp_path)
    good = base / "train" / "good"
    os.symlink(tmp_path / "gone.png", good / "009.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt, name, extra in (("JPEG", "cut.jpg", {}), ("PNG", "cut_exif.png", {"exif": Image.Exif()})):
        extra.get("exif", {})[0x0112] = 1  # Pillow writes eXIf before the pixels: the EXIF read loads none of them
        buf = io.BytesIO()
        noise.save(buf, fmt, **extra)
        (good / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(np.full((8, 8), 128.0, np.float32), mode="F").save(good / "f128.tif")
    os.mkfifo(good / "fifo.png")  # was left out without a word
    with pytest.raises(LayoutError) as err:
        load_category(tmp_path, "cat")
    assert [p.split(":")[0] for p in err.value.problems] == [str(good / n) for n in ("009.png", "cut.jpg", "cut_exif.png",
                                                                                     "f128.tif", "fifo.png")]
    assert "broken symbolic link" in err.value.problems[0] and "truncated" in err.value.problems[1]
    assert "truncated" in err.value.problems[2] and "float pixels, read as 0 (black) to 1" in err.value.problems[3]
    assert "not an image file but a FIFO" in err.value.problems[4]
    for name in ("009.png", "cut.jpg", "cut_exif.png", "f128.tif", "fifo.png"):
        (good / name).unlink()
    _png(base / "test" / ".ipynb_checkpoints" / "000-checkpoint.png")
    _png(base / "test" / "scratch" / "001.png")
    _png(base / "ground_truth" / "scratch" / "001_mask.PNG", mode="L", value=255)
    _png(base / "ground_truth" / "scratch" / "002_mask.png", mode="L", value=255)
    (base / "train" / "good" / "003.gif").write_bytes(b"GIF89a")
    (base / "train" / "good" / ".DS_Store").write_bytes(b"")
    _png(base / "train" / "good" / "day2" / "100.png")  # images moved into a sub-folder: not read, said so
    _png(base / "test" / "loose.png")  # no folder to say what it is: not evaluated, said so (was dropped silently)
    with caplog.at_level("WARNING"):
        cat = load_category(tmp_path, "cat")
    assert f"{base / 'test'}: 1 image(s) directly in test/, not evaluated (e.g. loose.png)" in caplog.text
    assert f"{base / 'train/good'}: 1 sub-folder(s) not read (images are read from this folder itself" in caplog.text
    assert "not from folders inside it): day2" in caplog.text
    assert f"{base / 'train/good'}: 1 file(s) not read, their extensions not an image's" in caplog.text
    assert caplog.text.count("file(s) not read") == 1 and "003.gif" in caplog.text
    assert [(s.path.name, s.mask_path and s.mask_path.name) for s in cat.test] == [
        ("000.png", None), ("000.png", "000_mask.png"), ("001.png", "001_mask.PNG")]
    assert f"{base / 'ground_truth/scratch/002_mask.png'}: mask without a test image" in caplog.text


def test_mask_of_another_size(tmp_path):
    base = _category(tmp_path)
    _png(base / "ground_truth" / "scratch" / "000_mask.png", size=(16, 32), mode="L", value=255)
    with pytest.raises(LayoutError, match="mask of another size") as err:
        load_category(tmp_path, "cat")
    assert "EXIF" not in str(err.value)


def test_mask_drawn_on_the_stored_pixels_of_an_exif_rotated_image(tmp_path):
    base = _category(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter
    Image.new("RGB", (40, 20)).save(base / "test" / "scratch" / "000.png", exif=exif)
    _png(base / "ground_truth" / "scratch" / "000_mask.png", size=(40, 20), mode="L", value=255)
    with pytest.raises(LayoutError, match=r"\(40x20\) than its image .* \(20x40\); sizes are upright, after EXIF"):
        load_category(tmp_path, "cat")
    Image.new("RGB", (20, 40)).save(base / "test" / "scratch" / "000.png")  # transposed, no EXIF: no EXIF hint
    with pytest.raises(LayoutError, match=r"\(40x20\) than its image .* \(20x40\)") as err:
        load_category(tmp_path, "cat")
    assert "EXIF" not in str(err.value)


def test_unreadable_file_and_all_problems_listed(tmp_path):
    base = _category(tmp_path)
    (base / "train" / "good" / "bad.png").write_bytes(b"this is not a png")
    (base / "train" / "good" / "empty.png").write_bytes(b"")
    with pytest.raises(LayoutError) as err:
        load_category(tmp_path, "cat")
    assert len(err.value.problems) == 2
    assert "bad.png" in str(err.value) and "empty.png" in str(err.value) and "empty file" in str(err.value)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK", "RGB"])
def test_any_mode_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
        assert img.mode.startswith("I;16")
    else:
        img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    if mode == "I;16":  # rescaled from 16 bit, not clipped to 255
        assert 100 < rgb.mean() < 160


def test_wide_grey_images_are_read_on_one_scale_not_stretched(tmp_path):
    """Float and 32-bit images were stretched to their own min and max: a frame at 40% exposure read as
    the normal one, and one hot pixel darkened the rest. Float is 0..1 and 32-bit the 16-bit scale; what
    lies outside is refused, naming the file and the range."""
    grey = np.random.default_rng(0).integers(20, 200, (20, 30)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.float32) / 255, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(grey.astype(np.float32) / 255 * 0.4, mode="F").save(tmp_path / "dark.tif")
    hot = grey.astype(np.int32) * 257
    hot[0, 0] = 65535
    Image.fromarray(hot, mode="I").save(tmp_path / "hot.tif")
    assert np.array_equal(load_rgb(tmp_path / "unit.tif"), load_rgb(tmp_path / "grey8.png"))
    assert abs(load_rgb(tmp_path / "dark.tif").mean() - 0.4 * grey.mean()) < 1
    assert np.array_equal(load_rgb(tmp_path / "hot.tif")[1:], load_rgb(tmp_path / "grey8.png")[1:])
    Image.fromarray(grey.astype(np.float32), mode="F").save(tmp_path / "f255.tif")
    Image.fromarray(grey.astype(np.int32) * 1000, mode="I").save(tmp_path / "wide.tif")
    near = grey.astype(np.float32) / 255
    near[0, 0], near[0, 1] = np.nextafter(np.float32(1), np.float32(2)), -1e-8  # a pipeline's rounding: still 0..1
    Image.fromarray(near, mode="F").save(tmp_path / "near.tif")
    assert load_rgb(tmp_path / "near.tif")[0, :2, 0].tolist() == [255, 0]
    with pytest.raises(ImageError, match=r"f255.tif: float pixels, read as 0 \(black\) to 1 \(white\), range from 20.0 to "):
        load_rgb(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"wide.tif: 32-bit integer pixels, read on the 16-bit scale .* write it as 8- or 16-bit"):
        load_rgb(tmp_path / "wide.tif")


def _png_rgb16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow writes none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_twelve_bit_colour_in_sixteen_bit_files_is_warned_of(tmp_path, caplog, monkeypatch):
    """Pillow reads 16-bit colour from each sample's high byte: a colour camera's 12-bit data stored unshifted reads
    nearly black (at most 16 levels), and --white-level reads grey only, so it is said; full-range data is not."""
    from pni_ray.data import images

    monkeypatch.setattr(images, "_FEW_BITS_SAID", images.threading.Event())
    rng = np.random.default_rng(0)
    _png_rgb16(tmp_path / "full.png", rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16))
    with caplog.at_level("WARNING"):
        assert load_rgb(tmp_path / "full.png").max() > 200
    assert "16-bit colour" not in caplog.text
    _png_rgb16(tmp_path / "cam12.png", rng.integers(0, 4096, (8, 8, 3)).astype(np.uint16))
    with caplog.at_level("WARNING"):
        assert load_rgb(tmp_path / "cam12.png").max() <= 15
    assert "cam12.png: 16-bit colour pixels no brighter than about 4095 (12 bits or fewer)" in caplog.text
    assert "Write the camera's colour images with 8 bits per channel" in caplog.text


def test_twelve_bit_data_in_sixteen_bit_files_is_warned_of_once(tmp_path, caplog, monkeypatch):
    from pni_ray.data import images

    monkeypatch.setattr(images, "_FEW_BITS_SAID", images.threading.Event())
    for i in range(2):
        Image.fromarray(np.full((8, 8), 4000 + i, np.uint16)).save(tmp_path / f"mono12_{i}.png")
        with caplog.at_level("WARNING"):
            assert load_rgb(tmp_path / f"mono12_{i}.png").max() == 16  # 4000 / 65535 * 255
    assert caplog.text.count("12 bits or fewer") == 1 and "mono12_0.png: 16-bit or 32-bit grey pixels no brighter than 4000" in caplog.text


def test_a_multi_page_tiff_says_only_its_first_page_is_read(tmp_path, caplog):
    pages = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 200)]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    with caplog.at_level("WARNING"):
        assert load_rgb(tmp_path / "two.tif").max() == 10
    assert "two.tif: 2 pages or frames; only the first is read" in caplog.text


def test_transparent_mask_is_read_over_black(tmp_path):
    """An editor's mask: white strokes on a transparent layer whose hidden colour is white too."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[5:9, 3:7, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").sum() == 16


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_image_with_a_non_finite_pixel_is_refused(tmp_path, bad):
    """One NaN or infinite pixel made the min-max rescale NaN, cast to 0: the image scored as all black."""
    arr = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "ok.tif")
    assert load_rgb(tmp_path / "ok.tif").std() > 10
    arr[0, 0] = bad
    Image.fromarray(arr, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(ImageError, match=r"bad.tif: 1 of 600 pixels are NaN or infinite"):
        load_rgb(tmp_path / "bad.tif")


def test_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_rgb(path).shape == (40, 20, 3)


def test_unreadable_exif_leaves_the_pixels_readable(tmp_path, caplog):
    """An EXIF block that is not TIFF data (Pillow: SyntaxError) says nothing of the pixels: the image is
    read as stored, with a warning naming it, by the layout check, the decoder and the mask reader."""
    from pni_ray.data.images import image_size

    pixels = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "bad_exif.png", exif=b"garbage-exif-bytes")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 3:7] = 255
    Image.fromarray(mask).save(tmp_path / "bad_exif_mask.png", exif=b"garbage-exif-bytes")
    with caplog.at_level("WARNING"):
        assert image_size(tmp_path / "bad_exif.png") == (30, 20)
        assert np.array_equal(load_rgb(tmp_path / "bad_exif.png"), pixels)
        assert np.array_equal(load_rgb(tmp_path / "bad_exif.png"), pixels)
        assert np.array_equal(load_mask(tmp_path / "bad_exif_mask.png"), mask > 0)
    # once per file, however often a run reads it
    assert caplog.text.count("its EXIF block is not readable") == 2 and "bad_exif.png" in caplog.text


def test_truncated_and_bomb(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        load_rgb(tmp_path / "trunc.png")
    _png(tmp_path / "big.png", size=(200, 200))
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_rgb(tmp_path / "big.png", max_pixels=10_000)


def test_masks_in_any_two_levels_keep_their_defect_pixels(tmp_path, caplog):
    """0 / 255 (MVTec AD), 0 / 1 and a palette mask whose defect colour is dark once grey all mark the
    same pixels; an empty mask of a defect image is read as empty, and said."""
    marked = np.zeros((6, 8), bool)
    marked[1:3, 2:5] = True
    Image.fromarray(marked.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    edge = marked.astype(np.uint8) * 255
    edge[0, 2] = 127  # an antialiased edge pixel stays outside, as it always did
    Image.fromarray(edge).save(tmp_path / "edge.png")
    Image.fromarray(marked.astype(np.uint8)).save(tmp_path / "m01.png")
    palette = Image.fromarray(marked.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red: grey 76
    palette.save(tmp_path / "mp.png")
    instances = marked.astype(np.uint8)
    instances[1:3, 4] = 3  # an instance mask (VisA): every instance is defect
    Image.fromarray(instances).save(tmp_path / "m013.png")
    for name in ("m255.png", "edge.png", "m01.png", "mp.png", "m013.png"):
        assert np.array_equal(load_mask(tmp_path / name), marked), name
    assert not load_mask(_png(tmp_path / "empty.png", size=(8, 6), mode="L", value=0)).any()
    base = _category(tmp_path / "root")
    _png(base / "ground_truth" / "scratch" / "000_mask.png", mode="L", value=0)
    cat = load_category(tmp_path / "root", "cat")
    sample = next(s for s in cat.test if s.label)
    with caplog.at_level("WARNING"):
        assert not cat.mask(sample, (32, 32)).any()
        assert not cat.mask(sample, (32, 32)).any()
    assert caplog.text.count("000_mask.png: the mask of a scratch image marks no pixel") == 1


def test_mask_size_check(tmp_path):
    _png(tmp_path / "m.png", size=(8, 6), mode="L", value=200)
    assert load_mask(tmp_path / "m.png", (6, 8)).all()
    with pytest.raises(ImageError, match="mask is 8x6"):
        load_mask(tmp_path / "m.png", (8, 8))
