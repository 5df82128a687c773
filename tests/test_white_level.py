"""12-bit camera data in 16-bit files: a model trained with geometry.white_level reads every image on that
scale, in training, the layout check, batch scoring's decode and the report; brighter pixels are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pni_ray.config import GeometryConfig
from pni_ray.data.images import ImageError, load_rgb
from pni_ray.data.mvtec import LayoutError, load_category
from tests.conftest import tiny_config

WHITE = 4095  # a 12-bit camera's white, written unshifted into 16-bit files


def _copies(src: Path, root12: Path, root8: Path) -> None:
    """The category as a 12-bit camera would write it (grey, 0..4095 in uint16 PNGs) and as its 8-bit grey
    twin: v12 = round(v8 * 4095 / 255) reads back as v8 on the 12-bit scale."""
    for path in sorted(src.rglob("*.png")):
        rel = path.relative_to(src)
        for root in (root12, root8):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in rel.parts:
            shutil.copy(path, root12 / rel)
            shutil.copy(path, root8 / rel)
            continue
        grey = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(grey).save(root8 / rel)
        Image.fromarray(np.round(grey.astype(np.float64) * WHITE / 255).astype(np.uint16)).save(root12 / rel)


@pytest.fixture(scope="module")
def twins(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("white_level")
    root12, root8 = base / "twelve", base / "eight"
    _copies(synthetic_root / "washer", root12 / "washer", root8 / "washer")
    return root12, root8


def test_white_level_reads_twelve_bit_data_on_its_own_scale(tmp_path, caplog, monkeypatch):
    from pni_ray.data import images

    monkeypatch.setattr(images, "_FEW_BITS_SAID", images.threading.Event())
    ramp = np.linspace(0, WHITE, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with caplog.at_level("WARNING"):
        assert load_rgb(tmp_path / "ramp.png").max() == 16  # on the 16-bit scale: 1/16 of the grey levels
    assert "train with --white-level 4095" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read = load_rgb(tmp_path / "ramp.png", white_level=WHITE)
    assert read.max() == 255 and len(np.unique(read)) == 256 and not caplog.text  # the whole range, no warning
    Image.fromarray(np.full((8, 8), 5000, np.uint16)).save(tmp_path / "bright.png")
    with pytest.raises(ImageError, match=r"bright.png: integer grey pixels from 5000.0 to 5000.0, above the model's "
                                         r"white level 4095"):
        load_rgb(tmp_path / "bright.png", white_level=WHITE)
    Image.fromarray(np.full((8, 8), -5, np.int32), mode="I").save(tmp_path / "negative.tif")
    with pytest.raises(ImageError, match=r"negative.tif: integer grey pixels from -5.0 to -5.0: below 0"):
        load_rgb(tmp_path / "negative.tif", white_level=WHITE)
    # 8-bit and float images are not rescaled by it
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "eight.png")
    assert load_rgb(tmp_path / "eight.png", white_level=WHITE).max() == 200
    for bad in (0, 65536, 4095.0, True):
        with pytest.raises(ValueError, match="geometry.white_level"):
            GeometryConfig(white_level=bad)


def test_a_twelve_bit_model_is_its_eight_bit_twin_and_scores_like_it(twins, tmp_path):
    """Trained with --white-level 4095 on 12-bit files, the model's files are those of the same config trained
    on the 8-bit copies; `score` decodes the 12-bit test images as their copies, and refuses a brighter one."""
    from pni_ray.bundle import save_bundle
    from pni_ray.orchestration.score import Options, score
    from pni_ray.report import build_report
    from pni_ray.training import train_category

    root12, root8 = twins
    cfg8 = tiny_config()
    cfg12 = dataclasses.replace(cfg8, geometry=GeometryConfig(white_level=WHITE))
    b12 = save_bundle(train_category(root12, "washer", cfg12, progress=False), tmp_path / "b12")
    b8 = save_bundle(train_category(root8, "washer", cfg8, progress=False), tmp_path / "b8")
    for name in ("memory.arrow", "neighbourhood.safetensors", "position_prior.arrow"):
        assert (b12 / name).read_bytes() == (b8 / name).read_bytes(), name
    assert json.loads((b12 / "manifest.json").read_text())["config"]["geometry"]["white_level"] == WHITE

    bright = tmp_path / "bright"
    bright.mkdir()
    Image.fromarray(np.full((128, 128), WHITE + 1, np.uint16)).save(bright / "too_bright.png")
    out12, out8 = tmp_path / "s12", tmp_path / "s8"
    s12 = score(b12, [str(root12 / "washer" / "test"), str(bright)], out12, Options(threads=1), engine="local")
    s8 = score(b8, [str(root8 / "washer" / "test")], out8, Options(threads=1), engine="local")
    assert s8["failed"] == 0 and s12["failed"] == 1 and "too_bright.png: integer grey pixels from 4096.0" in s12["failures"][0]["error"]
    import pyarrow.parquet as pq

    def scores(out: Path, root: Path) -> dict[str, float]:
        rows = pq.read_table(out, columns=["path", "image_score"]).to_pylist()
        return {str(Path(r["path"]).relative_to(root)): r["image_score"] for r in rows if r["image_score"] is not None}

    assert scores(out12, root12) == pytest.approx(scores(out8, root8), rel=1e-5)
    assert json.loads((out12 / "_dataset.json").read_text())["white_level"] == WHITE  # the report reads on it
    html, info = build_report(out12, top_n=2)
    assert html.count("data:image/png;base64,") == 2 * 2 + 1  # images, not only maps: read on the model's scale


def test_the_layout_check_refuses_brighter_images_before_training(twins, tmp_path):
    root12, _ = twins
    root = tmp_path / "data"
    shutil.copytree(root12 / "washer", root / "washer")
    Image.fromarray(np.full((128, 128), 4200, np.uint16)).save(root / "washer" / "train" / "good" / "hot.png")
    assert load_category(root, "washer", with_test=False).train  # on the 16-bit scale it is a dim image
    with pytest.raises(LayoutError, match=r"hot.png: integer grey pixels from 4200.0 to 4200.0, above the model's "
                                          r"white level 4095"):
        load_category(root, "washer", with_test=False, white_level=WHITE)


def test_train_takes_white_level_and_refuses_values_off_the_scale(tmp_path):
    from pni_ray.cli import main
    from pni_ray.options import build_config

    assert build_config(white_level=WHITE).geometry.white_level == WHITE
    assert build_config().geometry.white_level is None
    result = CliRunner().invoke(main, ["train", str(tmp_path), "-c", "x", "--out", str(tmp_path / "b"),
                                       "--white-level", "70000"])
    assert result.exit_code == 2 and "--white-level" in result.output and "70000" in result.output
