"""`pni-ray report`: one self-contained HTML file with histogram, threshold, maps and failures."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pni_ray.orchestration.score import Options, score
from pni_ray.report import build_report, colormap, histogram_svg, overlay


@pytest.fixture(scope="module")
def scored(tmp_path_factory, synthetic_root, bundle_tiny):
    """The washer test split (good and defective) plus bad files, one with an HTML-ish name."""
    root = tmp_path_factory.mktemp("report_inputs")
    shutil.copytree(synthetic_root / "washer" / "test", root / "test")
    (root / "bad").mkdir()
    (root / "bad" / "<b>evil & co.png").write_bytes(b"<script>alert(1)</script>")
    (root / "bad" / "empty.png").write_bytes(b"")
    out = tmp_path_factory.mktemp("report_out") / "out"
    summary = score(bundle_tiny, [str(root / "test"), str(root / "bad")], out, Options(threads=1), engine="local")
    return root, out, summary


def test_report_is_self_contained_and_complete(scored, tmp_path):
    root, out, summary = scored
    html, info = build_report(out, top_n=5)
    assert info["rows"] == summary["rows"] and info["failed"] == 2 and info["top"] == [t["path"] for t in summary["top"][:5]]
    # no network: no external URLs, scripts or stylesheets
    assert not re.search(r"https?://|src=\"//|<script|<link", html)
    # histogram with the threshold
    assert html.count("<svg") == 1 and 'class="threshold"' in html and f"threshold {summary['threshold']:.4g}" in html
    assert ("bar-bad" in html) == (summary["anomalous"] > 0)
    # the 5 most anomalous, each with image and overlaid map, plus the colour scale
    assert html.count("data:image/png;base64,") == 2 * 5 + 1
    assert html.count('<div class="card') == 5
    for path in info["top"]:
        assert path in html
    # failures listed, their names escaped
    assert "Failures (2)" in html and "&lt;b&gt;evil &amp; co.png" in html and "<b>evil" not in html
    assert "empty file (0 bytes)" in html


def test_report_cli_and_degraded_inputs(scored, tmp_path, bundle_tiny, synthetic_root):
    from pni_ray.cli import main

    root, out, _ = scored
    target = tmp_path / "r" / "report.html"
    result = CliRunner().invoke(main, ["report", str(out), "--html", str(target), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith("<!doctype html>")
    again = CliRunner().invoke(main, ["report", str(out), "--html", str(target), "--top", "3"])
    assert again.exit_code == 0, again.output  # an earlier report is replaced
    image = tmp_path / "r" / "top.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not a report")
    over = CliRunner().invoke(main, ["report", str(out), "--html", str(image)])
    assert over.exit_code == 2 and "exists and is not an HTML file" in over.output, over.output
    assert image.read_bytes().startswith(b"\x89PNG")  # the image is kept
    # images deleted after scoring: the maps are still shown; --map-format none: images only
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_root / "washer" / "test" / "good", moved)
    nomap = tmp_path / "nomap"
    score(bundle_tiny, [str(moved)], nomap, Options(map_format="none", threads=1), engine="local")
    html, _ = build_report(nomap, top_n=2)
    assert "no map stored" in html and html.count("data:image/png") == 2
    gone_out = tmp_path / "gone"
    gone_in = tmp_path / "gone_in"
    shutil.copytree(synthetic_root / "washer" / "test" / "good", gone_in)
    score(bundle_tiny, [str(gone_in)], gone_out, Options(threads=1), engine="local")
    shutil.rmtree(gone_in)
    html, _ = build_report(gone_out, top_n=2)
    assert "image no longer readable" in html and html.count("data:image/png") == 2 + 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty), "--html", str(tmp_path / "x.html")])
    assert result.exit_code != 0 and "no part-" in result.output


def test_histogram_and_colours():
    svg = histogram_svg([1.0, 2.0, 2.5, 9.0], threshold=5.0)
    assert svg.count('class="bar-bad"') == 1 and svg.count('class="bar-ok"') == 3 and "threshold 5" in svg
    assert "No scored images" in histogram_svg([], 1.0)
    assert 'class="threshold"' not in histogram_svg([1.0, 2.0], float("inf"))
    lut = colormap(np.array([0.0, 1.0]))
    assert lut.dtype == np.uint8 and lut[0, 2] > lut[0, 0] and lut[1, 0] > lut[1, 2]  # blue -> red
    rgb = np.full((4, 4, 3), 128, np.uint8)
    hot = overlay(rgb, np.full((4, 4), 10.0, np.float32), 0.0, 10.0)
    assert hot.shape == (4, 4, 3) and hot[0, 0, 0] > 128 and overlay(None, np.zeros((4, 4)), 0, 1).shape == (4, 4, 3)
    Image.fromarray(hot)  # a valid image


def test_report_shows_images_whose_names_the_table_escapes(tmp_path, bundle_tiny, synthetic_root):
    """A name with a backslash or non-UTF-8 bytes is escaped in the path column (row_path); the report
    opens the file itself (path_of_row), so its image is shown, not "no longer readable"."""
    import os

    data = sorted((synthetic_root / "washer" / "test" / "good").glob("*.png"))[0].read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (b"back\\slash.png", b"bad\xff.png"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
            fh.write(data)
    out = tmp_path / "out"
    score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")
    html, info = build_report(out, top_n=2)
    assert "back\\\\slash.png" in html and "no longer readable" not in html
    assert html.count("data:image/png") == 2 * 2 + 1  # each image with its map, and the colour scale
