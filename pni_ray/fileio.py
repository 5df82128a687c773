"""Crash-safe file writes, checksums and manifest/Arrow reading, torch-free so the edge runtime
and readers can share them.

Every write goes to a temporary sibling, is fsynced, and is renamed over its target: a reader
sees the old file or the new one, never half of one. Bundles, ensembles and export directories
are folders with a `manifest.json`; one reader checks them all, so their errors read alike.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

_COUNT_CAP = 10_000  # files counted in a refused directory before saying "at least"


class OutputWriteError(OSError):
    """A whole-directory save that the disk refused (full, over a size or quota limit, read-only): named by the
    directory it was writing, so the user sees where to make room, not a traceback from deep in a writer."""

    def __str__(self) -> str:
        return str(self.strerror)


# what a disk refuses to take: said as the save's own error, in one line
DISK_REFUSALS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def disk_refused(exc: OSError) -> bool:
    """A full disk, a size or quota limit, a read-only file system: by errno, or by the words of writers that
    raise without one (pyarrow's IO errors carry the system's message only)."""
    return exc.errno in DISK_REFUSALS or (exc.errno is None and any(
        os.strerror(code) in str(exc) for code in DISK_REFUSALS))


class NotReplaceable(FileExistsError, ValueError):
    """`--force` met a path that is not what the command writes: it is left alone; the message says what it holds.

    A FileExistsError (what a refused overwrite raises) and a ValueError (what the CLIs report as errors).
    """


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path | str) -> None:
    """Persist a file's bytes, or a directory's entries after a rename; a path that cannot be opened is left."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree_durable(src: Path | str, dst: Path | str) -> None:
    """shutil.copytree, each copied file and folder fsynced: a copy into a staged directory is on disk
    before that directory is renamed into place (a power loss then leaves the old one or the whole new one)."""
    def copy_and_sync(a: str, b: str) -> str:
        shutil.copy2(a, b)
        fsync_path(b)
        return b

    shutil.copytree(src, dst, copy_function=copy_and_sync)
    for folder in sorted({p for p in Path(dst).rglob("*") if p.is_dir()} | {Path(dst)}, reverse=True):
        fsync_path(folder)


def not_regular(mode: int) -> str | None:
    """What a path that is not a regular file is (opening a FIFO would wait for a writer for ever)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "something other than a regular file"


def special_file(path: Path | str) -> str | None:
    """What is at `path` (links followed) if it is neither a regular file nor a directory: a rename over
    it would put a file where /dev/null or a pipe was."""
    try:
        kind = not_regular(os.stat(path).st_mode)
    except OSError:
        return None
    return kind if kind not in (None, "a directory") else None


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temp sibling, fsync, rename over path. A failed write (a full disk) removes its temp
    file and names path in the error, which a bare write error does not. A device, FIFO or socket at
    path is refused, never replaced."""
    path = Path(path)
    kind = special_file(path)
    if kind is not None:
        raise OSError(errno.EEXIST, f"it is {kind}, not a file: give a file's path", str(path))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            exc.filename = str(path)
        raise
    fsync_path(path.parent)


def finite_json(obj: Any) -> Any:
    """obj with every non-finite float (a threshold of +inf, an undefined AUROC) as None: JSON has no
    Infinity or NaN, and strict readers (JavaScript's JSON.parse, Go, jq --strict) refuse a file
    that holds one. Readers take null back as "none" (`Normalisation.from_record`: no threshold)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:  # a numpy / torch scalar
        return finite_json(obj.item())
    return obj


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Strict JSON (non-finite floats written as null), written atomically."""
    text = json.dumps(finite_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def _count_files(folder: Path) -> str:
    """"N files" under folder (at any depth), counting no further than _COUNT_CAP."""
    n = 0
    for _, _, files in os.walk(folder):
        n += len(files)
        if n >= _COUNT_CAP:
            return f"at least {_COUNT_CAP} files"
    return f"{n} file{'' if n == 1 else 's'}"


def manifest_format(folder: Path | str) -> str | None:
    """The `format` of folder/manifest.json, or None when there is no readable manifest object."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    return fmt if isinstance(fmt, str) else None


def check_replaceable(out: Path | str, formats: str | tuple[str, ...], kind: str, option: str = "--out") -> None:
    """Raise NotReplaceable unless replacing `out` whole loses nothing but a directory of its own kind.

    Replaceable: a missing path, an empty directory, or a directory whose manifest.json has one of
    `formats` (a bundle for `train --force`, an export directory for `export --force`). Anything else,
    e.g. a folder of Parquet scores or a user's own files, is refused with what it holds.
    """
    out = Path(out)
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not out.exists() and not out.is_symlink():
        return
    advice = f"choose another {option} or move it away yourself"
    only = f"only {_a(kind)} directory (or an empty one) is ever replaced"
    if out.is_symlink():
        raise NotReplaceable(f"{out} is a symbolic link (to {os.readlink(out)}): {only}, not a link; give the "
                             f"directory it points to, or {advice}")
    if not out.is_dir():
        raise NotReplaceable(f"{out} is a file, not {_a(kind)} directory: {only}; {advice}")
    if not any(out.iterdir()):
        return
    fmt = manifest_format(out)
    if fmt in formats:
        return
    if fmt is None:
        holds = (f"an unreadable {MANIFEST}" if (out / MANIFEST).exists() else f"no {kind} manifest")
        raise NotReplaceable(f"{out} holds {_count_files(out)} and {holds}; {only}: {advice}")
    raise NotReplaceable(f"{out} holds a {fmt} manifest, not {_a(kind)}; {only}: {advice}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


@contextmanager
def staged_dir(out: Path, replaces: str | tuple[str, ...], kind: str, overwrite: bool = True) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write a whole directory into.

    When the block finishes it replaces `out` in one rename (replace_dir); when the block
    raises it is removed, so a reader never sees a half-written bundle or export. An existing
    `out` must be replaceable (check_replaceable: missing, empty, or a directory of the writer's own
    format `replaces`): checked before anything is written and again just before the rename.
    Without `overwrite` an existing `out` is refused, checked again once this writer holds the lock
    and before the rename: two saves started side by side without --force no longer both pass the
    callers' early check, the second then silently replacing the first.
    """
    check_replaceable(out, replaces, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):  # under it, any partial sibling is a dead writer's: safe to remove
        _refuse_existing(out, overwrite)
        remove_stale_siblings(out)
        tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            yield tmp
            _refuse_existing(out, overwrite)  # where no lock could be had, another writer may have finished
            check_replaceable(out, replaces, kind)  # minutes may have passed: something else may be there now
            replace_dir(tmp, out)
        except OSError as exc:
            if not disk_refused(exc):
                raise
            where = f", writing {exc.filename}" if exc.filename else ""
            raise OutputWriteError(exc.errno, f"{out}: the {kind} could not be written ({exc.strerror or exc}{where}; "
                                   f"{'nothing replaced, ' if out.exists() else ''}nothing half-written left): make "
                                   "room on that disk or write to another") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if not overwrite and out.exists():
        raise FileExistsError(f"{out} already exists: another save wrote it while this one was running; "
                              "pass --force to replace it")


@contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Writers of one `out` take turns, on an flock of `.<name>.lock` beside it (released by the
    kernel even on SIGKILL). Without it a second writer's stale-sibling cleanup deleted the first
    one's directory while it was being written. The holder removes the file when done (a killed
    holder's file is reused by the next writer); a waiter that then wakes on the removed file's lock
    finds the path gone or another file there and locks what is there now, so only one writer ever
    holds the lock on the path's current file. Opened read-only (flock needs no write access). Where
    the file cannot be opened (another user's, unreadable) or the file system has no flock, the
    save goes on unserialised, as before, with a warning: a lock never refuses a save."""
    path = out.with_name(f".{out.name}.lock")
    fd = _locked_fd(path, out)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # while still locked: a waiter on this file sees it gone and retries
                path.unlink()
            os.close(fd)


def _locked_fd(path: Path, out: Path) -> int | None:
    """A descriptor holding the flock on the path's current file, or None when no lock can be had."""
    said = False
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as exc:
            log.warning("%s: cannot open %s (%s); writing without serialising against other writers", out, path, exc)
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log.info("%s: another process is writing it; waiting for it to finish", out)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except OSError as exc:  # ENOLCK / EOPNOTSUPP on some network and FUSE file systems
            os.close(fd)
            log.warning("%s: cannot lock %s (%s); writing without serialising against other writers", out, path, exc)
            return None
        except BaseException:  # Ctrl-C while waiting: the descriptor (and any lock it holds) goes
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # the holder removed the file we waited on: lock the path's current file


def remove_stale_siblings(out: Path) -> list[Path]:
    """What a write of `out` killed mid-way left beside it: `.<name>.partial-*` (never renamed into
    place), and `.<name>.old-*` (a replaced copy not yet deleted) once `out` exists. Without `out`, an
    `.old-*` may be the only copy of the previous `out`, so it stays. Returns what was removed."""
    removed = []
    name, suffix = glob.escape(out.name), "[0-9a-f]" * 8  # exactly staged_dir's and replace_dir's names
    patterns = [f".{name}.partial-{suffix}"] + ([f".{name}.old-{suffix}"] if out.exists() else [])
    for pattern in patterns:
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a fully written directory `tmp` to `out`, replacing any previous `out` whole."""
    fsync_path(tmp)
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)


def write_arrow(path: Path | str, table: pa.Table) -> None:
    """An Arrow IPC file (the caller writes into a temporary directory that is renamed whole)."""
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fsync_path(path)  # on disk before the directory is renamed into place


def read_arrow(path: Path | str) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).read_all()


def arrow_from_bytes(raw: bytes) -> pa.Table:
    """An Arrow IPC file's table from its bytes (as read and checked once, `bundle_manifest.read_verified`)."""
    return ipc.open_file(pa.py_buffer(raw)).read_all()


def read_json(path: Path | str, error: type[Exception] = ValueError) -> Any:
    """Parsed JSON of `path`; a syntax error is raised as `error` naming the file."""
    return parse_json(Path(path).read_bytes(), path, error)


def parse_json(raw: bytes, path: Path | str, error: type[Exception] = ValueError) -> Any:
    """`raw` (the bytes of `path`) parsed; a syntax error is raised as `error` naming the file."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # bytes that are not even text: named too
        raise error(f"{path}: not valid JSON ({exc})") from exc


def inside(path: Path | str, folder: Path | str) -> bool:
    """Whether `path` is `folder` or lies under it, links followed (a link into the folder is the folder)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def read_manifest_json(
    folder: Path | str, fmt: str, version: int, error: type[Exception], kind: str, hint: str = "",
    required: dict[str, type] | None = None, raw: bytes | None = None,
) -> dict[str, Any]:
    """`folder`/manifest.json (or `raw`, its bytes as already read), checked to be a `fmt` manifest no
    newer than `version`, holding each `required` key with a value of its type, and (when it lists
    `files`) each file by a plain name inside the folder with a sha256: a hand-edited manifest fails
    here, naming the key, not later as a KeyError.

    kind names the folder in messages ("bundle", "export", ...); hint is appended when the
    manifest is of another format (e.g. what to run instead).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{folder}: not {'an' if kind[:1] in 'aeiou' else 'a'} {kind} directory")
    file = folder / MANIFEST
    if not file.is_file():  # a data folder given by mistake, or a copy cut short: say both
        raise error(f"{folder}: incomplete {kind}, {MANIFEST} is missing (not {'an' if kind[:1] in 'aeiou' else 'a'} "
                    f"{kind}, or one whose copy or save did not finish)")
    manifest = read_json(file, error) if raw is None else parse_json(raw, file, error)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found_fmt = manifest.get("format") if isinstance(manifest, dict) else None
        what = f" (it is a {found_fmt} manifest)" if isinstance(found_fmt, str) and found_fmt.startswith("pni-ray") else ""
        raise error(f"{file}: not a {fmt} manifest{what}{hint}")
    found = manifest.get("format_version", 0)
    if not isinstance(found, int) or isinstance(found, bool):
        raise error(f"{file}: format_version must be an integer, got {found!r}")
    if found > version:
        raise error(f"{file}: {kind} format version {found} is newer than this pni-ray reads ({version}); upgrade pni-ray")
    for key, kind_of in (required or {}).items():
        if not isinstance(manifest.get(key), kind_of):
            raise error(f"{file}: {key!r} is missing or not a {kind_of.__name__} (got {manifest.get(key)!r:.60}); "
                        f"the manifest was edited or truncated: restore the {kind}")
    for name, meta in (manifest.get("files") or {}).items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise error(f"{file}: files lists {name!r}, not a file name inside the {kind}: restore the {kind}")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise error(f"{file}: files[{name!r}] has no sha256: restore the {kind}")
    return manifest
