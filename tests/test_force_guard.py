"""What an overwrite may remove (fileio.check_replaceable, staged_dir, save_bundle), and the
warnings of a too-small training set or test split."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from pni_ray.fileio import NotReplaceable, check_replaceable, staged_dir


def _manifest(folder, fmt):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": fmt, "format_version": 1}))
    (folder / "memory.arrow").write_bytes(b"x")
    return folder


def test_check_replaceable(tmp_path):
    check_replaceable(tmp_path / "missing", "pni-ray-bundle", "bundle")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "pni-ray-bundle", "bundle")
    check_replaceable(_manifest(tmp_path / "b", "pni-ray-bundle"), "pni-ray-bundle", "bundle")
    with pytest.raises(NotReplaceable, match="holds a pni-ray-bundle manifest, not an export"):
        check_replaceable(tmp_path / "b", "pni-ray-export", "export")
    scores = _manifest(tmp_path / "scores", "pni-ray-scores")  # a Parquet/Arrow results folder is never replaced
    with pytest.raises(NotReplaceable, match="pni-ray-scores"):
        check_replaceable(scores, ("pni-ray-bundle", "pni-ray-export"), "bundle or export")
    user = tmp_path / "user" / "deep"
    user.mkdir(parents=True)
    (user / "a.txt").write_text("a")
    with pytest.raises(NotReplaceable, match=r"holds 1 file and no bundle manifest.*choose another --out") as info:
        check_replaceable(tmp_path / "user", "pni-ray-bundle", "bundle")
    assert str(tmp_path / "user") in str(info.value)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, ValueError)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(NotReplaceable, match="unreadable manifest.json"):
        check_replaceable(tmp_path / "bad", "pni-ray-bundle", "bundle")
    (tmp_path / "f").write_text("f")
    with pytest.raises(NotReplaceable, match="is a file"):
        check_replaceable(tmp_path / "f", "pni-ray-bundle", "bundle")


def test_staged_dir_never_replaces_a_user_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.parquet").write_bytes(b"PAR1")
    with pytest.raises(NotReplaceable):
        with staged_dir(out, "pni-ray-export", "export") as tmp:  # only a directory of the writer's own format
            (tmp / "x").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.parquet").is_file()
    target = _manifest(tmp_path / "export", "pni-ray-export")
    with pytest.raises(NotReplaceable, match="not an ensemble"):  # an export is not an ensemble's to replace
        with staged_dir(target, "pni-ray-ensemble", "ensemble"):
            pass
    with staged_dir(target, "pni-ray-export", "export") as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_save_bundle_overwrites_bundles_only(bundle_tiny, tmp_path):
    import shutil

    from pni_ray.bundle import load_bundle, save_bundle, verify_bundle

    trained, _ = load_bundle(bundle_tiny)
    copy = tmp_path / "copy"
    shutil.copytree(bundle_tiny, copy)
    (copy / "extra.txt").write_text("gone after the replace")
    save_bundle(trained, copy, overwrite=True)  # a bundle is replaced whole
    assert verify_bundle(copy)["category"] == "washer" and not (copy / "extra.txt").exists()
    results = tmp_path / "results"
    results.mkdir()
    (results / "scores.parquet").write_bytes(b"PAR1")
    with pytest.raises(NotReplaceable, match="no bundle manifest"):
        save_bundle(trained, results, overwrite=True)
    assert [p.name for p in results.iterdir()] == ["scores.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "results"]  # no temp dir left


def test_two_saves_without_force_never_replace_each_other(bundle_tiny, tmp_path, monkeypatch):
    """Both pass save_bundle's early "already exists" check before either has written; the second then
    waited at the lock and replaced the first's bundle. Now it is refused once it holds the lock."""
    import threading

    from pni_ray import bundle as bundle_module
    from pni_ray.bundle import load_bundle, save_bundle, verify_bundle

    trained, _ = load_bundle(bundle_tiny)
    out, entered, go, results = tmp_path / "B", threading.Event(), threading.Event(), {}
    real_write = bundle_module.write_arrow

    def slow_first_write(path, table):
        if threading.current_thread().name == "first" and not entered.is_set():
            entered.set()
            go.wait(30)
        return real_write(path, table)

    monkeypatch.setattr(bundle_module, "write_arrow", slow_first_write)

    def save(name):
        try:
            save_bundle(trained, out, overwrite=False)
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 (the test reports what failed)
            results[name] = exc

    first = threading.Thread(target=save, args=("first",), name="first")
    first.start()
    assert entered.wait(30)  # the first holds the lock, its bundle half-written; nothing at B yet
    second = threading.Thread(target=save, args=("second",), name="second")
    second.start()
    second.join(0.5)
    assert second.is_alive()  # past the early check, waiting at the lock
    go.set()
    first.join(30)
    second.join(30)
    assert results["first"] == "ok"
    assert isinstance(results["second"], FileExistsError) and "--force" in str(results["second"])
    assert verify_bundle(out)["category"] == "washer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]  # no partial or lock file left


def test_train_refused_because_another_save_got_there_first_says_so_in_one_line(synthetic_root, trained_tiny, tmp_path,
                                                                               monkeypatch):
    """Another `pni-ray train` of the same OUT finished while this one trained: one `Error:` line, no traceback."""
    from click.testing import CliRunner

    from pni_ray import fit
    from pni_ray.bundle import save_bundle
    from pni_ray.cli import main

    out = tmp_path / "B"

    def other_save_first(*args, **kwargs):
        save_bundle(trained_tiny, out)
        return trained_tiny

    monkeypatch.setattr(fit, "fit_category", other_save_first)
    result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", "washer", "--out", str(out)])
    assert result.exit_code == 1 and not isinstance(result.exception, FileExistsError), result.output
    assert "Error:" in result.output and "already exists" in result.output and "--force" in result.output


# ---------------------------------------------------------------- small data warnings


def test_small_training_set_warning_thresholds():
    from pni_ray.training import small_training_set_warning

    assert small_training_set_warning(180, 20) is None
    assert small_training_set_warning(10, 5) is None
    message = small_training_set_warning(3, 2)
    assert "only 3 images in the memory bank" in message and "only 2 held-out images" in message
    assert "unreliable" in message
    assert "uncalibrated default" in small_training_set_warning(40, 0)


def test_training_on_five_images_warns(tmp_path, caplog):
    from conftest import tiny_config

    from pni_ray.data.synthetic import SyntheticSpec, make_synthetic
    from pni_ray.training import train_category

    make_synthetic(tmp_path, categories=["granite"],
                   spec=SyntheticSpec(size=64, n_train=5, n_test_good=0, n_test_defect_per_type=0))
    with caplog.at_level(logging.WARNING, logger="pni_ray"):
        train_category(tmp_path, "granite", tiny_config(), progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 3 images in the memory bank" in w and "only 2 held-out images" in w and "unreliable" in w
               for w in warnings), warnings


def test_training_on_copies_of_one_image_warns(tmp_path, caplog):
    """One image copied to make up the count: the held-out copies score ~0 and the threshold (~1e-5) flags almost
    any other image, which training used to say nothing of."""
    import os

    from conftest import tiny_config

    from pni_ray.data.synthetic import SyntheticSpec, make_synthetic
    from pni_ray.training import copies_warning, train_category

    make_synthetic(tmp_path / "src", categories=["granite"],
                   spec=SyntheticSpec(size=64, n_train=1, n_test_good=0, n_test_defect_per_type=0))
    good = tmp_path / "data" / "granite" / "train" / "good"
    good.mkdir(parents=True)
    one = next((tmp_path / "src" / "granite" / "train" / "good").glob("*.png"))
    for i in range(12):
        os.link(one, good / f"{i:03d}.png")
    with caplog.at_level(logging.WARNING, logger="pni_ray"):
        trained = train_category(tmp_path / "data", "granite", tiny_config(), progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("copies of memory-bank images" in w and "distinct" in w for w in warnings), warnings
    assert copies_warning(trained.normalisation) is not None
    assert copies_warning(dataclasses.replace(trained.normalisation, extras={"holdout_max_image_score": 12.5})) is None


def test_a_test_split_of_one_label_warns(tmp_path, caplog):
    from pni_ray.data.mvtec import Category, TestSample
    from pni_ray.evaluate import _test_paths

    cat = Category(root=tmp_path, name="c", train=[], test=[TestSample(tmp_path / "a.png", "good", None)])
    with caplog.at_level(logging.WARNING, logger="pni_ray"):
        assert _test_paths(cat) == [tmp_path / "a.png"]
    assert any("good images only" in r.getMessage() and "undefined" in r.getMessage() for r in caplog.records)


def test_ensemble_force_refuses_a_user_folder_before_reading_the_members(bundle_tiny, tmp_path):
    from click.testing import CliRunner

    from pni_ray.cli import main

    out = tmp_path / "reports"
    out.mkdir()
    (out / "week.html").write_text("<html></html>")
    (tmp_path / "not-a-bundle").mkdir()  # never read: OUT is refused first
    result = CliRunner().invoke(main, ["ensemble", str(bundle_tiny), str(tmp_path / "not-a-bundle"),
                                       "--out", str(out), "--force"])
    assert result.exit_code != 0 and "no ensemble manifest" in result.output, result.output
    assert [p.name for p in out.iterdir()] == ["week.html"]
