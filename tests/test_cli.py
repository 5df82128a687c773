"""The `pni-ray` command line: train, evaluate (plain and ablation JSON), data tools, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pni_ray.cli import main

TINY = ["--image-size", "128", "--coreset-ratio", "0.1", "--dist-size", "64", "--epochs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_bundle(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "granite"
    result = CliRunner().invoke(
        main, ["-q", "train", str(synthetic_root), "--category", "granite", "--out", str(out),
               "--backbone", "efficientnet_lite0", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert "trained granite" in result.output
    return out


def test_train_refuses_existing_without_force(cli_bundle, synthetic_root):
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(cli_bundle), *TINY])
    assert result.exit_code != 0 and "--force" in result.output


def test_evaluate_json(cli_bundle, synthetic_root, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(synthetic_root), "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= data[key] <= 1.0
    assert data["n_test_images"] == 4 + 2 * 2
    assert "image_auroc" in result.output
    # the model's own decision on the labelled images, as `score` writes is_anomalous
    from pni_ray.orchestration.score import Options, score

    decided = data["at_threshold"]
    manifest = json.loads((cli_bundle / "manifest.json").read_text())
    assert decided["threshold"] == manifest["threshold"] and (decided["n_good"], decided["n_defect"]) == (4, 4)
    summary = score(cli_bundle, [str(synthetic_root / "granite" / "test")], tmp_path / "s", Options(threads=1),
                    engine="local")
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "s", columns=["path", "is_anomalous"]).to_pylist()
    good = [r["is_anomalous"] for r in rows if "/good/" in r["path"]]
    defect = [r["is_anomalous"] for r in rows if "/good/" not in r["path"]]
    assert (sum(good), len(defect) - sum(defect)) == (decided["good_flagged"], decided["defects_missed"])
    assert summary["rows"] == 8 and (f"{decided['good_flagged']} of 4 good images flagged, "
                                     f"{decided['defects_missed']} of 4 defect images missed") in result.output


def test_evaluate_ablation_json(cli_bundle, synthetic_root, tmp_path):
    out = tmp_path / "a.json"
    result = CliRunner().invoke(
        main, ["-q", "evaluate", str(cli_bundle), str(synthetic_root), "--ablation", "--json", str(out), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) >= {"patchcore", "neighbourhood", "position", "pni"}
    for row in modes.values():
        assert set(row) >= {"image_auroc", "pixel_auroc", "aupro", "f1_max", "images_per_s"}
    for mode in ("patchcore", "neighbourhood", "position", "pni"):
        assert mode in result.output
    # whether each prior bites: in the JSON per mode and in the printed table
    for mode, row in modes.items():
        diag = row["diagnostics"]
        assert 0.0 < diag["allowed_share"] <= 1.0
        for key in ("changed_normal", "changed_defect"):
            assert 0.0 <= diag[key] <= 1.0
        assert diag["score_change_normal"] >= -1e-4 and diag["score_change_defect"] >= -1e-4  # masks only raise
        assert ("mlp_val_top1" in diag) == (mode in ("neighbourhood", "pni"))
        assert ("neighbourhood_cut" in diag) == (mode in ("neighbourhood", "pni"))
    assert modes["patchcore"]["diagnostics"]["allowed_share"] == 1.0
    assert modes["patchcore"]["diagnostics"]["changed_defect"] == 0.0
    assert modes["position"]["diagnostics"]["allowed_share"] < 0.5  # the position prior narrows C_emb
    assert "allowed_share" in result.output and "changed_defect" in result.output


def test_train_bad_layout_names_the_file(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "train" / "good" / "x.png").write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["-q", "train", str(tmp_path), "-c", "cat", "--out", str(tmp_path / "o"), *TINY])
    assert result.exit_code == 1  # a click error naming the file, not a traceback
    assert isinstance(result.exception, SystemExit) and "x.png" in result.output


def test_make_synthetic_and_backbones(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["make-synthetic", str(tmp_path / "s"), "--size", "64", "--categories", "weave"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "weave" / "train" / "good").is_dir()
    result = runner.invoke(main, ["backbones"])
    assert "efficientnet_lite0" in result.output and "wide_resnet50_2" in result.output


# ---------------------------------------------------------------- --force replaces only its own kind


def _user_folder(path):
    """A folder that is no bundle: scoring results a user keeps."""
    path.mkdir(parents=True)
    (path / "part-0.parquet").write_bytes(b"PAR1")
    (path / "part-1.parquet").write_bytes(b"PAR1")
    return path


def _no_traceback(result):
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a click error, not a crash
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["train", "refine"])
def test_force_leaves_a_folder_of_other_files_alone(command, cli_bundle, synthetic_root, tmp_path):
    out = _user_folder(tmp_path / "results")
    args = (["train", str(synthetic_root), "-c", "granite", *TINY] if command == "train"
            else ["refine", str(cli_bundle), str(synthetic_root), "--threads", "1"])
    result = CliRunner().invoke(main, ["-q", *args, "--out", str(out), "--force"])
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    assert str(out) in result.output and "holds 2 files and no bundle manifest" in result.output
    assert "choose another --out or move it away yourself" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "part-1.parquet"]


def test_train_force_leaves_a_file_and_an_export_alone(synthetic_root, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(file),
                                       "--force", *TINY])
    assert result.exit_code == 1 and "is a file" in result.output and file.read_text() == "mine"
    without = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(file), *TINY])
    assert without.exit_code == 1 and "is a file" in without.output and "use --force" not in without.output  # no advice --force refuses
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "manifest.json").write_text(json.dumps({"format": "pni-ray-export", "format_version": 1}))
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(export_dir),
                                       "--force", *TINY])
    assert result.exit_code == 1 and "holds a pni-ray-export manifest, not a bundle" in result.output
    assert (export_dir / "manifest.json").is_file()


def test_train_force_replaces_an_empty_directory(synthetic_root, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(out),
                                       "--force", "--backbone", "efficientnet_lite0", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["format"] == "pni-ray-bundle"


def test_export_force_leaves_other_folders_alone(cli_bundle, tmp_path):
    results = _user_folder(tmp_path / "results")
    result = CliRunner().invoke(main, ["-q", "export", str(cli_bundle), "--out", str(results), "--force"])
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    assert str(results) in result.output and "holds 2 files and no export manifest" in result.output
    assert len(list(results.iterdir())) == 2
    bundle_copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle, bundle_copy)
    result = CliRunner().invoke(main, ["-q", "export", str(cli_bundle), "--out", str(bundle_copy), "--force"])
    assert result.exit_code == 1 and "holds a pni-ray-bundle manifest, not an export" in result.output
    assert sorted(p.name for p in bundle_copy.iterdir()) == sorted(p.name for p in cli_bundle.iterdir())


# ---------------------------------------------------------------- DATA_ROOT / category mistakes


def test_train_wrong_category_lists_the_categories(synthetic_root, tmp_path):
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granit", "--out",
                                       str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    out = result.output
    assert str(synthetic_root / "granit") in out and "'-c' / '--category'" in out
    assert "DATA_ROOT is the folder that holds the category folders" in out and "train/good/" in out
    assert "granite, pillbox, washer, weave" in out and "Did you mean -c granite?" in out
    assert not (tmp_path / "o").exists()


def test_a_category_written_in_another_unicode_form_is_named_as_such(tmp_path):
    """A folder copied from macOS keeps its name decomposed (NFD); the name typed is composed (NFC). The two differ
    byte for byte, so "Did you mean -c café?" read as the name just typed: the error now says what differs."""
    import unicodedata

    (tmp_path / "data" / unicodedata.normalize("NFD", "café") / "train" / "good").mkdir(parents=True)
    typed = unicodedata.normalize("NFC", "café")
    result = CliRunner().invoke(main, ["-q", "train", str(tmp_path / "data"), "-c", typed, "--out",
                                       str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    assert "in another Unicode form ('cafe\\u0301' against 'caf\\xe9'" in result.output, result.output
    assert "convmv -f utf8 -t utf8 --nfc" in result.output and "Did you mean" not in result.output


@pytest.mark.parametrize("name", ["../synthetic_link/granite", "line2/granite", "..", ""])
def test_a_category_is_one_folder_name_not_a_path(synthetic_root, tmp_path, name):
    """-c with a path would train a folder outside DATA_ROOT and write its bundle wherever the path led (into
    the data tree, under train-all): a usage error instead, for train and train-all alike."""
    from pni_ray.orchestration.train_all_cli import train_all_cmd

    (tmp_path / "synthetic_link").symlink_to(synthetic_root)
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, ["-q", "train", str(tmp_path / "data"), "-c", name, "--out",
                                       str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    assert "a category is one folder name directly under DATA_ROOT, without '/' or '..'" in result.output
    if name.startswith("../"):
        assert "give its parent as DATA_ROOT and -c granite" in result.output
    many = CliRunner().invoke(train_all_cmd, [str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--categories",
                                              name or ",", *TINY])
    assert many.exit_code == 2 and not (tmp_path / "o").exists(), many.output


def test_a_bad_threads_variable_is_a_usage_error_naming_it(cli_bundle, synthetic_root, tmp_path, monkeypatch):
    """An empty $PNI_RAY_THREADS (a templated job's blank) means unset; 'abc' or '-2' ended in int()'s or torch's
    traceback in every command that reads it: a usage error naming the variable, evaluate's and score's alike."""
    from pni_ray.config import threads_from_env

    for value, expected in (("", None), (" 3 ", 3)):
        monkeypatch.setenv("PNI_RAY_THREADS", value)
        assert threads_from_env() == expected
    for value in ("abc", "-2", "0"):
        monkeypatch.setenv("PNI_RAY_THREADS", value)
        for args in (["evaluate", str(cli_bundle), str(synthetic_root)],
                     ["score", str(cli_bundle), str(synthetic_root / "washer" / "test" / "good"), "--out",
                      str(tmp_path / "s"), "--engine", "local"]):
            result = CliRunner().invoke(main, ["-q", *args])
            assert result.exit_code in (2, 3), result.output
            _no_traceback(result)
            assert f"$PNI_RAY_THREADS='{value}': a number of threads, at least 1" in result.output, result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                                                  "DefaultCPUAllocator: can't allocate memory: you tried")])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(synthetic_root, tmp_path, monkeypatch, error):
    """--image-size 3200 on a small machine ended in torch's allocator traceback; it is one line saying what to lower."""
    import pni_ray.training

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(pni_ray.training, "train_category", too_big)
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "washer", "--out", str(tmp_path / "o"),
                                       *TINY])
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    assert "out of memory (" in result.output and "a smaller --image-size or --coreset-ratio" in result.output


def test_train_data_root_is_a_category_folder(synthetic_root, tmp_path):
    """The fix names the folder as the user reached it: through a link, the link's path, not its target's."""
    (tmp_path / "data").symlink_to(synthetic_root)
    result = CliRunner().invoke(main, ["-q", "train", str(tmp_path / "data" / "granite"), "-c", "granite", "--out",
                                       str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    assert str(tmp_path / "data" / "granite" / "granite") in result.output and "'DATA_ROOT'" in result.output
    assert "looks like a category folder (it has train/): pass its parent" in result.output
    assert f"DATA_ROOT: {tmp_path / 'data'} -c granite" in result.output


def test_train_data_root_not_mvtec(tmp_path):
    root = _user_folder(tmp_path / "results")
    result = CliRunner().invoke(main, ["-q", "train", str(root), "-c", "bottle", "--out", str(tmp_path / "o"), *TINY])
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    assert str(root / "bottle") in result.output and "No category folders (sub-folders with train/)" in result.output


def test_evaluate_and_refine_wrong_category(cli_bundle, synthetic_root, tmp_path):
    for args in (["evaluate", str(cli_bundle), str(synthetic_root), "-c", "granit"],
                 ["refine", str(cli_bundle), str(synthetic_root), "-c", "granit", "--out", str(tmp_path / "r")]):
        result = CliRunner().invoke(main, ["-q", *args, "--threads", "1"])
        assert result.exit_code == 2, result.output
        _no_traceback(result)
        assert str(synthetic_root / "granit") in result.output and "Did you mean -c granite?" in result.output
    # the bundle's own category missing from DATA_ROOT: DATA_ROOT is what to fix, or -c
    other = tmp_path / "other"
    shutil.copytree(synthetic_root / "weave", other / "weave")
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(other), "--threads", "1"])
    assert result.exit_code == 2 and "the bundle's category is 'granite'" in result.output
    assert "Categories found under" in result.output and "weave" in result.output
    _no_traceback(result)


def test_evaluate_without_test_images(cli_bundle, synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root / "granite" / "train", root / "granite" / "train")
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(root), "--threads", "1"])
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    assert str(root / "granite") in result.output and "no test images to evaluate on" in result.output
    assert "test/good/" in result.output


@pytest.mark.parametrize("train", ["broken", "absent"])
def test_evaluate_reads_the_test_split_only(cli_bundle, synthetic_root, tmp_path, train):
    """A labelled test set shipped without train/good, or beside a broken training image, evaluates: train/good is
    training's to check (evaluate used to refuse, naming a file it never reads)."""
    root = tmp_path / "root"
    for part in ("test", "ground_truth"):
        shutil.copytree(synthetic_root / "granite" / part, root / "granite" / part)
    if train == "broken":
        shutil.copytree(synthetic_root / "granite" / "train", root / "granite" / "train")
        (root / "granite" / "train" / "good" / "zz.png").write_bytes(b"")
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(root), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "image_auroc" in result.output and "zz.png" not in result.output


def test_evaluate_other_category_warns(cli_bundle, synthetic_root):
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(synthetic_root), "-c", "weave",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "trained on category 'granite'" in result.stderr
    assert "'weave'" in result.stderr and "image_auroc" in result.stdout


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("flags, shown", [((), {"ours", "exported"}), (("-q",), set()),
                                           (("-v",), {"ours", "exported", "debug", "third-party"})])
def test_logging_shows_this_projects_lines_and_keeps_other_libraries_quiet(flags, shown, terminal):
    """onnxruntime's quantiser logs INFO lines on the root logger: shown only with -v. On a terminal too, where the
    lines go through tqdm (above the bars) in the same format (once, they lost it and -v's lines)."""
    script = (
        "import logging, sys\n"
        "import pni_ray.cli\n"
        f"pni_ray.cli.on_terminal = lambda: {terminal}\n"
        "from pni_ray.cli import main\n"
        "main.add_command(__import__('click').command('probe')(lambda: [\n"
        "    logging.info('third-party'), logging.getLogger('pni_ray.training').info('ours'),\n"
        "    logging.getLogger('pni_ray.export.quantize').info('exported'), logging.getLogger('pni_ray.x').debug('debug')]))\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *flags, "probe"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = {word for word in ("ours", "exported", "debug", "third-party") if f": {word}" in run.stderr}
    assert printed == shown, run.stderr
    if "ours" in shown:
        assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO pni_ray.training: ours$", run.stderr, re.M), run.stderr


def test_evaluate_image_only_needs_no_masks(bundle_tiny, synthetic_root, tmp_path):
    """Labels without masks (a line's sorted good and bad images): image AUROC and F1, the pixel metrics n/a;
    without the flag, the missing masks are refused with the flag named."""
    from conftest import strict_json

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", root / "washer", ignore=shutil.ignore_patterns("ground_truth"))
    refused = CliRunner().invoke(main, ["evaluate", str(bundle_tiny), str(root), "--threads", "1"])
    assert refused.exit_code == 1 and "defect image without a mask" in refused.output
    assert "`evaluate --image-only` gives the image-level metrics" in refused.output
    full, only = tmp_path / "full.json", tmp_path / "only.json"
    for args, out in (([str(synthetic_root)], full), ([str(root), "--image-only"], only)):
        result = CliRunner().invoke(main, ["evaluate", str(bundle_tiny), *args, "--json", str(out), "--threads", "1"])
        assert result.exit_code == 0, result.output
    full, only = strict_json(full), strict_json(only)
    assert only["image_auroc"] == full["image_auroc"] and only["f1_max"] == full["f1_max"]
    assert full["pixel_auroc"] is not None and only["pixel_auroc"] is None and only["aupro"] is None


def test_a_stopped_command_says_what_is_left_and_exits_3(cli_bundle, synthetic_root, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's stop) used to kill train, evaluate and export without a word (status 143), and Ctrl-C
    ended in click's "Aborted!" with exit 1, a failure's status. Both now stop every command as the batch commands
    stop: one line naming the signal and what is left, exit 3; an export's staging folder and lock are gone."""
    import os
    import signal

    import pni_ray.fit
    from pni_ray.export import onnx_export

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises within this
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(pni_ray.fit, "fit_category", terminated)
    out = tmp_path / "B"
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(out), *TINY])
    assert result.exit_code == 3, result.output
    assert "interrupted (SIGTERM): nothing is left half-written" in result.output and "start over" in result.output
    assert not out.exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "trace_to_onnx", interrupted)
    export = tmp_path / "E"
    result = CliRunner().invoke(main, ["-q", "export", str(cli_bundle), "--out", str(export), "--threads", "1"])
    assert result.exit_code == 3 and "interrupted (SIGINT)" in result.output and "Aborted" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no E, no .E.partial-*, no .E.lock


def test_progress_bars_only_where_someone_watches(cli_bundle, synthetic_root, monkeypatch):
    """A bar in a job's log file is one endless line of carriage returns: evaluate drew its bars whatever stderr was."""
    from pni_ray.options import progress_bars

    assert progress_bars(True) and not progress_bars(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_bars()
    result = CliRunner().invoke(main, ["evaluate", str(cli_bundle), str(synthetic_root), "--threads", "1"])
    assert result.exit_code == 0 and "image_auroc" in result.output
    assert "\r" not in result.output and "scoring:" not in result.output, result.output


def test_tables_and_summaries_say_only_what_was_measured(capsys, tmp_path):
    """The ablation table's 19-letter headers over 12-wide numbers put values under the wrong header; a run that
    scored nothing reported "0.4 images/s"."""
    from pni_ray.evaluate import DIAGNOSTIC_KEYS
    from pni_ray.options import print_table
    from pni_ray.orchestration.score_cli import echo_summary

    print_table({"patchcore": {k: 0.5 for k in DIAGNOSTIC_KEYS}, "pni": {}}, DIAGNOSTIC_KEYS)
    header, *rows = capsys.readouterr().out.splitlines()
    ends = [m.end() for m in re.finditer(r"\S+", header)][1:]  # the mode column is left-aligned
    for row in rows:
        assert [m.end() for m in re.finditer(r"\S+", row)][1:] == ends, (header, row)  # each value ends under its header
    summary = {"inputs": 1, "scored": 0, "failed": 1, "anomalous": 0, "anomaly_rate": None, "missing": 0,
               "duplicate_rows": 0, "top": [], "failures": [{"error": "x: no images"}],
               "run": {"already_done": 0, "images_per_s": 0.4, "scored_this_run": 0}}
    echo_summary(summary, tmp_path)
    assert "images/s" not in capsys.readouterr().out
    echo_summary({**summary, "scored": 1, "run": {**summary["run"], "scored_this_run": 1}}, tmp_path)
    assert "0.4 images/s" in capsys.readouterr().out
