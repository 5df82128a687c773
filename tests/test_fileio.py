"""Shared file helpers: atomic writes, checksums, the one manifest reader of bundles/ensembles/exports."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from conftest import strict_json
from pni_ray.fileio import (
    atomic_write_json,
    copy_tree_durable,
    read_arrow,
    read_json,
    read_manifest_json,
    replace_dir,
    sha256_file,
    staged_dir,
    write_arrow,
)


class FolderError(ValueError):
    pass


def manifest_dir(tmp_path, content) -> object:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def read(folder):
    return read_manifest_json(folder, "fmt-x", 2, FolderError, "export", hint=" (try Y)")


def test_manifest_reader_accepts_its_format(tmp_path):
    folder = manifest_dir(tmp_path, {"format": "fmt-x", "format_version": 2, "a": 1})
    assert read(folder)["a"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "manifest.json: not valid JSON"),
        ([1, 2], "manifest.json: not a fmt-x manifest (try Y)"),
        ({"format": "other"}, "manifest.json: not a fmt-x manifest (try Y)"),
        ({"format": "fmt-x", "format_version": 3}, "export format version 3 is newer than this pni-ray reads (2)"),
    ],
)
def test_manifest_reader_names_the_file_and_the_problem(tmp_path, content, message):
    folder = manifest_dir(tmp_path, content)
    with pytest.raises(FolderError) as info:
        read(folder)
    assert str(info.value).startswith(str(tmp_path / "model" / "manifest.json"))
    assert message in str(info.value)


def test_manifest_reader_missing_folder_or_file(tmp_path):
    with pytest.raises(FolderError, match="nowhere: not an export directory"):
        read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError, match=r"empty: incomplete export, manifest.json is missing \(not an export, or one "):
        read(tmp_path / "empty")


def test_the_formats_use_it(tmp_path):
    """Bundle, ensemble and export readers refuse each other's manifests with their own error."""
    from pni_ray.export.tables import ExportError
    from pni_ray.export.tables import read_manifest as read_export
    from pni_ray.bundle import BundleError
    from pni_ray.bundle import read_manifest as read_bundle
    from pni_ray.ensemble_bundle import read_ensemble_manifest

    complete = {"category": "c", "mode": "pni", "config": {}, "files": {}, "backbone": {}, "normalisation": {},
                "grid": [40, 40]}
    folder = manifest_dir(tmp_path, {"format": "pni-ray-bundle", "format_version": 1, **complete})
    with pytest.raises(ExportError, match="run `pni-ray export` on it"):
        read_export(folder)
    with pytest.raises(BundleError, match=r"not a pni-ray-ensemble manifest \(it is a pni-ray-bundle manifest\)"):
        read_ensemble_manifest(folder)
    assert read_bundle(folder)["format"] == "pni-ray-bundle"
    (folder / "manifest.json").write_text(json.dumps({"format": "pni-ray-bundle", "format_version": 99}))
    with pytest.raises(BundleError, match="bundle format version 99 is newer"):
        read_bundle(folder)
    # a hand-edited manifest fails when read, naming what is wrong, not later as a KeyError
    base = {"format": "pni-ray-bundle", "format_version": 1, **complete}
    for change, match in (({"mode": None}, "'mode' is missing or not a str"),
                          ({"format_version": "1"}, "format_version must be an integer"),
                          ({"files": {"../../other/memory.arrow": {"sha256": "0"}}}, "not a file name inside the bundle"),
                          ({"files": {"memory.arrow": {"bytes": 3}}}, r"files\['memory.arrow'\] has no sha256"),
                          # evaluate read the top-level one, score the other: one value, or refused
                          ({"threshold": 1.0, "normalisation": {"threshold": 37.5}},
                           r"'threshold' \(1.0\) and 'normalisation.threshold' \(37.5\) differ")):
        (folder / "manifest.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(BundleError, match=match):
            read_bundle(folder)
    (folder / "manifest.json").write_text('{"threshold": NaN, "normalisation": {"threshold": NaN}, '
                                          + json.dumps(base)[1:])  # an old manifest's two NaNs agree
    assert read_bundle(folder)["format"] == "pni-ray-bundle"
    (folder / "manifest.json").write_bytes(b"\xdc\xff" * 100)  # not even text: the file is named too
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON"):
        read_bundle(folder)
    export = {"format": "pni-ray-export", "format_version": 1, "files": {}, "graphs": {"mlp": {}},
              "tables": {"c_emb": "c_emb.arrow", "normalisation": "normalisation.arrow"},
              "pipeline": [], "scorer": {"coresets": "constant"}, "mode": "pni", "tau": 1e-4}
    (folder / "manifest.json").write_text(json.dumps({**export, "graphs": {}, "tau": None}))
    with pytest.raises(ExportError, match="'tau' is missing or not a float"):
        read_export(folder)
    from pni_ray.export.tables import verify_export

    (folder / "manifest.json").write_text(json.dumps(export))
    with pytest.raises(ExportError, match=r"graphs\['mlp'\] names no file"):
        verify_export(folder)


def test_read_json_and_atomic_json(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"b": 2, "a": [1]})
    assert read_json(path) == {"a": [1], "b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind
    path.write_text("[1,")
    with pytest.raises(FolderError, match="a.json: not valid JSON"):
        read_json(path, FolderError)


def test_atomic_json_is_strict_json(tmp_path):
    import numpy as np

    path = tmp_path / "m.json"
    atomic_write_json(path, {"threshold": float("inf"), "auroc": float("nan"), "rows": [1.5, float("-inf")],
                             "nested": {"x": (np.float32("inf"), np.float64(2.5))}, "n": 3})
    assert strict_json(path) == {"threshold": None, "auroc": None, "rows": [1.5, None],
                                 "nested": {"x": [None, 2.5]}, "n": 3}


def test_arrow_roundtrip_and_checksum(tmp_path):
    table = pa.table({"x": [1, 2, 3]}).replace_schema_metadata({b"k": b"v"})
    write_arrow(tmp_path / "t.arrow", table)
    again = read_arrow(tmp_path / "t.arrow")
    assert again.equals(table) and again.schema.metadata == {b"k": b"v"}
    digest = sha256_file(tmp_path / "t.arrow")
    write_arrow(tmp_path / "u.arrow", table)
    assert sha256_file(tmp_path / "u.arrow") == digest  # same table, same bytes


def test_a_durable_copy_fsyncs_every_file_and_folder_it_makes(tmp_path, monkeypatch):
    import pni_ray.fileio as fileio

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 10)
    (src / "sub" / "b.bin").write_bytes(b"b" * 20)
    synced: list[str] = []
    real = fileio.fsync_path
    monkeypatch.setattr(fileio, "fsync_path", lambda path: (synced.append(str(path)), real(path)))
    copy_tree_durable(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert (dst / "sub" / "b.bin").read_bytes() == b"b" * 20
    assert {str(dst / "a.bin"), str(dst / "sub" / "b.bin"), str(dst / "sub"), str(dst)} <= set(synced)


def test_replace_dir_swaps_whole_directories(tmp_path):
    out = tmp_path / "out"
    for version in ("old", "new"):
        tmp = tmp_path / f".tmp-{version}"
        tmp.mkdir()
        (tmp / "file").write_text(version)
        replace_dir(tmp, out)
    assert (out / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writers_of_one_directory_take_turns(tmp_path):
    """A second writer of the same bundle path waits for the first instead of deleting its
    half-written directory as a stale leftover (which failed the first with FileNotFoundError)."""
    import threading

    out, entered, go, results = tmp_path / "B", threading.Event(), threading.Event(), {}
    stale = tmp_path / ".B.lock"  # a killed save's lock file is reused, even read-only
    stale.touch(mode=0o444)

    def write(name, wait):
        try:
            with staged_dir(out, "pni-ray-bundle", "bundle") as tmp:
                entered.set()
                if wait:
                    go.wait(30)
                (tmp / "manifest.json").write_text(json.dumps({"format": "pni-ray-bundle", "by": name}))
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 (the test reports what failed)
            results[name] = repr(exc)

    first = threading.Thread(target=write, args=("first", True))
    first.start()
    assert entered.wait(30)
    entered.clear()
    second = threading.Thread(target=write, args=("second", False))
    second.start()
    assert not entered.wait(0.5)  # the second waits at the lock while the first writes
    go.set()
    first.join(30)
    second.join(30)
    assert results == {"first": "ok", "second": "ok"}
    assert json.loads((out / "manifest.json").read_text())["by"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]  # no partial, old copy or lock file left


@pytest.mark.parametrize("failing", ["open", "flock"])
def test_a_lock_that_cannot_be_had_never_refuses_a_save(tmp_path, monkeypatch, caplog, failing):
    """Another user's unreadable lock file (os.open: EACCES; root ignores modes, so it is simulated)
    or a file system without flock (ENOLCK): the save goes on unserialised, with a warning."""
    import errno
    import logging
    import os

    from pni_ray import fileio

    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refusing_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    if failing == "open":
        monkeypatch.setattr(fileio.os, "open", refusing_open)
    else:
        monkeypatch.setattr(fileio.fcntl, "flock", refusing_flock)
    out = tmp_path / "B"
    with caplog.at_level(logging.WARNING, logger="pni_ray.fileio"):
        with staged_dir(out, "pni-ray-bundle", "bundle") as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"format": "pni-ray-bundle"}))
    assert (out / "manifest.json").is_file()
    assert "writing without serialising" in caplog.text


def test_a_save_the_disk_refuses_is_named_by_its_directory(tmp_path):
    """A full disk (or a file-size limit) used to end a save in a traceback from deep inside a writer, naming no path."""
    import errno

    from click.testing import CliRunner

    import pni_ray.cli as cli
    from pni_ray.fileio import OutputWriteError, staged_dir

    out = tmp_path / "B"
    with pytest.raises(OutputWriteError) as caught:
        with staged_dir(out, "pni-ray-bundle", "bundle") as tmp:
            (tmp / "memory.arrow").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == (f"{out}: the bundle could not be written (No space left on device; nothing half-written "
                                 "left): make room on that disk or write to another")
    assert sorted(tmp_path.iterdir()) == []  # no partial folder, no lock
    with pytest.raises(OutputWriteError, match=r"\(Error writing bytes: No space left on device; nothing"):
        with staged_dir(out, "pni-ray-bundle", "bundle"):  # pyarrow's IO errors carry no errno, only the words
            raise OSError("Error writing bytes: No space left on device")
    with pytest.raises(PermissionError):  # other errors are not a disk's refusal: raised as they are
        with staged_dir(out, "pni-ray-bundle", "bundle"):
            raise PermissionError(errno.EACCES, "Permission denied")

    @cli.main.command("fill-disk")
    def fill_disk() -> None:
        with staged_dir(out, "pni-ray-bundle", "bundle"):
            raise OSError(errno.EFBIG, "File too large")

    try:
        result = CliRunner().invoke(cli.main, ["fill-disk"])
    finally:
        cli.main.commands.pop("fill-disk")
    assert result.exit_code == 1 and result.output == f"Error: {out}: the bundle could not be written (File too large; " \
        "nothing half-written left): make room on that disk or write to another\n"
