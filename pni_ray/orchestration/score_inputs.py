"""What `pni-ray score` reads: INPUT specs expanded to a sorted, de-duplicated path list, and its chunks.

INPUT is a file, a directory (recursive; image extensions only, hidden entries skipped and counted in a log line), a glob (``**`` allowed) or a list file (``@list`` or a ``.txt``/``.lst`` file: one path,
directory or glob per line, ``#`` comments, surrounding spaces dropped, relative lines relative to
the list file; write ``./#name`` for a file whose name starts with ``#``). A spec naming a path that
exists is taken literally even when it holds glob characters (``a[1].png``); only one that names no
path is a glob. Paths are made absolute and normalised but symlinks are not resolved; the same path
given twice is scored once (counted as ``duplicates_ignored``), two different paths to the same bytes
are two inputs. Directories are walked into symlinked subdirectories too: a link to a folder outside
the tree is walked (once, however many links lead there or into it: each folder outside is walked once); a link
into the tree, or to a folder that holds it, is skipped with a warning, since that folder is walked under its own name.
A glob's ``**`` gives what Python's glob gives (links followed: an image reached through a link is an input
under that path too) and the images below each folder it matches, each once, but ends in link loops, round
which Python's went until the path was too long; a folder it cannot list is an error row, as in a directory
input, and a pattern that names no file is one too.
An explicit path that does not exist, a directory without images, a subdirectory that cannot be
read, or a glob that matches nothing gets an error row.

The table's ``path`` column holds `pni_ray.results.row_path` of each input: the path itself where it
is UTF-8 and holds no backslash; otherwise an escaped form (backslashes doubled, bytes that are not
UTF-8, which Parquet strings cannot hold, as ``\\xNN``) that no other path can give, so rows and
inputs match one to one (resuming matches on this text).

Chunks are fixed-size runs of the sorted list, named by a hash of their paths, so a rerun over the
same inputs makes the same chunks and finds its committed part files.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from pni_ray.data.images import is_image_file
from pni_ray.fileio import inside

log = logging.getLogger(__name__)

CHUNK_SIZE = 64
LIST_SUFFIXES = (".txt", ".lst")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Inputs:
    """Sorted unique absolute paths, with errors known before decoding (missing, no glob match)."""

    paths: list[str]
    preset_errors: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    # every name an earlier run may have written a stand-in error row under for these specs (a pattern that
    # matched nothing, an empty or unlistable folder this run walks, an unreadable list): --retry-failed drops those rows,
    # so a folder that was empty last night and holds images now leaves no stale failure behind
    stand_ins: set[str] = field(default_factory=set)


def normalise_path(path: str, base: str | None = None, pattern: bool = False) -> str:
    """Absolute, without "." or doubled separators, and naming the file the OS opens: the part up to
    the last ".." is resolved as the OS resolves it (through links: lnk/.. is the link target's parent,
    not the folder holding the link, which a lexical normpath would give), the rest kept as written.
    pattern: `path` is a glob, so the folders it is relative to (the working directory, a list file's) and
    the resolved part are escaped (a folder named run[1] is no pattern), and a part of `path` holding
    wildcards itself is left to the lexical rule (there is no one folder to ask)."""
    path = os.path.expanduser(path)
    lead = "" if os.path.isabs(path) else os.path.join(os.getcwd(), base or "")  # abspath: ".." lexically
    typed = path.split(os.sep)
    parts = [*(lead.split(os.sep) if lead else []), *typed]
    literal = glob.escape if pattern else (lambda folder: folder)
    if ".." in typed:
        last = len(parts) - 1 - parts[::-1].index("..")
        own = typed[: last + 1 - (len(parts) - len(typed))]  # the typed part of what is resolved
        if not (pattern and _GLOB_CHARS.search(os.sep.join(own))):
            resolved = os.path.realpath(os.sep.join(parts[: last + 1]))
            return os.path.normpath(os.path.join(literal(resolved), *parts[last + 1:]))
    return os.path.normpath(os.path.join(literal(lead), path) if lead else path)


def _walk_tree(folder: str, onerror: Callable[[OSError], None]) -> Iterator[tuple[str, list[str], list[str], int]]:
    """os.walk of folder into symlinked subdirectories that lead out of it, each such folder once; a link into
    the tree, or to a folder holding it, is skipped with a warning (that folder is walked under its own name), so
    link loops end. Hidden folders are not entered. Yields (root, folders kept, files, hidden entries)."""
    top = os.path.realpath(folder)
    outside: set[str] = set()  # real folders outside the tree already walked (through a link, or below one)
    for root, dirs, files in os.walk(folder, onerror=onerror, followlinks=True):
        keep = []
        hidden = sum(name.startswith(".") for name in (*dirs, *files))
        for d in sorted(d for d in dirs if not d.startswith(".")):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            within = inside(real, top)
            if within and not os.path.islink(path):  # the tree's own folders, under their own names
                keep.append(d)
                continue
            # a link into the tree or to a folder holding it, or any folder outside it already walked (a second
            # link to it, or a link inside a linked folder back to one of its own ancestors)
            if within or inside(top, real) or real in outside:
                log.warning("%s: leads to %s, which this input already walks; not walked twice", path, real)
                continue
            outside.add(real)
            keep.append(d)
        dirs[:] = keep
        yield root, keep, files, hidden


def _unlistable(folder: str, preset: dict[str, str], unreadable: list[str]) -> Callable[[OSError], None]:
    """os.walk's onerror: a subdirectory that cannot be listed becomes an error row instead of vanishing."""
    def record(exc: OSError) -> None:
        unreadable.append(normalise_path(str(exc.filename)) if exc.filename else folder)
        preset[unreadable[-1]] = f"{unreadable[-1]}: cannot list this directory ({exc.strerror or exc}); its images were not scored"
    return record


def _walk_images(folder: str, preset: dict[str, str], walked: set[str]) -> list[str]:
    """Image files below folder (`_walk_tree`); a subdirectory that cannot be listed becomes an error row."""
    found: list[str] = []
    unreadable: list[str] = []
    others: list[str] = []  # files that are not images (sidecars, notes): counted, not scored
    hidden = 0  # hidden files and folders (".DS_Store", "._x.png", ".thumbnails"): not scored, counted
    for root, dirs, files, n_hidden in _walk_tree(folder, _unlistable(folder, preset, unreadable)):
        hidden += n_hidden
        walked.update(normalise_path(os.path.join(root, d)) for d in dirs)  # each may name an "unlistable" row
        found.extend(os.path.join(root, f) for f in files if is_image_file(Path(f)))
        others.extend(f for f in files if not is_image_file(Path(f)) and not f.startswith("."))
    if others:  # sidecar files are normal beside camera images: said once per folder, not an error row each
        log.info("%s: %d file(s) below it not scored, their extensions not an image's (e.g. %s)", folder, len(others),
                 ", ".join(sorted(others)[:3]))
    if hidden:
        log.info("%s: %d hidden file(s) or folder(s) below it (names starting with '.') not scored", folder, hidden)
    return found + unreadable


def _match_parts(pattern: Sequence[str], parts: Sequence[str], prefix: bool = False) -> bool:
    """Whether path components match pattern components as glob's do: `**` any number of them (none hidden),
    others one by fnmatch, a hidden name only by a pattern starting with '.'. prefix: whether a path below
    `parts` can still match (a folder worth entering)."""
    if not parts and (prefix or not pattern):
        return True
    if not pattern:
        return False
    first, rest = pattern[0], pattern[1:]
    if first == "**":
        for i in range(len(parts) + 1):
            if _match_parts(rest, parts[i:], prefix):
                return True
            if i < len(parts) and parts[i].startswith("."):
                return False
        return prefix  # `**` takes every part left
    if not parts or (parts[0].startswith(".") and not first.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], first) and _match_parts(rest, parts[1:], prefix)


def _glob_walk(top: str, onerror: Callable[[OSError], None],
               enter: Callable[[list[str]], bool]) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of top into every link to a folder, as Python's `**` goes, but not into a link to a folder the walk
    is already inside (a loop: Python's went round it until the path grew too long, hanging the run with no row
    written); `enter(parts below top)` says which folders can still hold a match."""
    inside_of: dict[str, frozenset[str]] = {top: frozenset({os.path.realpath(top)})}  # real folders above, per root
    for root, dirs, files in os.walk(top, onerror=onerror, followlinks=True):
        above = inside_of[root]
        rel = [] if root == top else os.path.relpath(root, top).split(os.sep)
        keep = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if real in above:
                log.warning("%s: leads to %s, a folder it is inside: a loop, not walked", path, real)
            elif enter([*rel, d]):
                inside_of[path] = above | {real}
                keep.append(d)
        dirs[:] = keep
        yield root, keep, files


def _recursive_glob(pattern: str, preset: dict[str, str], walked: set[str]) -> list[str]:
    """The inputs a `**` pattern names: every file it matches, and the images below every folder it matches (a
    walk of a folder input skips hidden folders), as glob.glob(pattern, recursive=True) and a walk of each matched
    folder gave them, links followed alike, but in one walk that ends in link loops (`_glob_walk`). The part
    before the first `**` is globbed, the rest matched component by component."""
    parts = pattern.split(os.sep)
    k = parts.index("**")
    head = os.sep.join(parts[:k]) or os.sep
    tail = parts[k:]
    tops = sorted(glob.glob(head)) if _GLOB_CHARS.search(head) else [head]
    found: list[str] = []

    def covered(rel: list[str]) -> bool:  # a matched folder, or below one (where a folder input's walk goes)
        return any(_match_parts(tail, rel[:i]) and not any(part.startswith(".") for part in rel[i:])
                   for i in range(len(rel) + 1))

    def enter(rel: list[str]) -> bool:
        return covered(rel) or _match_parts(tail, rel, prefix=True)

    for top in tops:
        if not os.path.isdir(top):
            continue
        unreadable: list[str] = []
        for root, dirs, files in _glob_walk(top, _unlistable(top, preset, unreadable), enter):
            rel = [] if root == top else os.path.relpath(root, top).split(os.sep)
            images_too = covered(rel)
            walked.update(normalise_path(os.path.join(root, d)) for d in dirs)  # each may name an "unlistable" row
            found.extend(os.path.join(root, f) for f in files
                         if _match_parts(tail, [*rel, f]) or (images_too and is_image_file(Path(f))))
        found.extend(unreadable)
    return found


def _expand_one(spec: str, base: str | None, out: list[str], preset: dict[str, str], stand_ins: set[str],
                origin: str = "") -> None:
    """A path, directory or glob (not a list file) -> paths appended to out. `origin` (" (line K of
    LIST)") is added to the error of a spec from a list file that names nothing, so the row says
    which line to fix."""
    if _GLOB_CHARS.search(spec) and not os.path.lexists(normalise_path(spec, base)):
        pattern = normalise_path(spec, base, pattern=True)
        stand_ins.add(pattern)
        if "**" in pattern.split(os.sep):  # files only: the matched folders' images are among them
            found = _recursive_glob(pattern, preset, stand_ins)
            if not found:
                out.append(pattern)
                preset[pattern] = f"{pattern}: no file matches this pattern{origin}"
            out.extend(normalise_path(f) for f in found)
            return
        matches = sorted(glob.glob(pattern))
        if not matches:
            out.append(pattern)
            preset[pattern] = f"{pattern}: no file matches this pattern{origin}"
        for m in matches:
            if os.path.isdir(m):
                stand_ins.add(normalise_path(m))  # unlistable once, a row under its name
                out.extend(_walk_images(m, preset, stand_ins))  # a glob may match many folders: empty ones are not errors
            else:
                out.append(normalise_path(m))
        return
    path = normalise_path(spec, base)
    stand_ins.add(path)  # a folder (empty or unlistable once) or a missing list line
    if os.path.isdir(path):
        found = _walk_images(path, preset, stand_ins)
        if not found:  # an empty camera folder is news, not silence
            out.append(path)
            preset[path] = f"{path}: directory contains no image files{origin}"
        out.extend(found)
    else:
        out.append(path)  # missing files are decoded into "file not found" rows
        if origin and not os.path.lexists(path):
            preset[path] = f"{path}: file not found{origin}"


def _read_list(path: str) -> list[tuple[int, str]]:
    """(line number, spec) of each line that names something. UTF-8, with or without a byte-order mark
    (Windows Notepad's), its bytes that are not UTF-8 kept as the file name's own (surrogateescape, as
    the file system's names are); UTF-16 with its byte-order mark (PowerShell's `>`). Without one, a
    NUL byte is refused: no file name holds one, and each line would become a name of garbage."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    elif b"\x00" in data:
        at = data.index(b"\x00")
        raise UnicodeDecodeError("utf-8", data, at, at + 1, "a NUL byte: UTF-16 without its byte-order mark? "
                                 "save the list as UTF-8")
    else:
        text = data.decode("utf-8-sig", errors="surrogateescape")
    lines = []
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append((number, line))
    return lines


def expand_inputs(specs: Iterable[str]) -> Inputs:
    """Files, directories, globs and list files -> the sorted, de-duplicated input list."""
    collected: list[str] = []
    preset: dict[str, str] = {}
    stand_ins: set[str] = set()
    for spec in specs:
        spec = str(spec)
        if spec.startswith("@") or (spec.lower().endswith(LIST_SUFFIXES) and os.path.isfile(spec)):
            list_path = normalise_path(spec[1:] if spec.startswith("@") else spec)
            stand_ins.add(list_path)
            try:
                lines = _read_list(list_path)
            except (OSError, UnicodeDecodeError) as exc:
                collected.append(list_path)
                preset[list_path] = f"{list_path}: cannot read the list file ({exc.__class__.__name__}: {exc})"
                continue
            if not lines:  # an upstream step that wrote no names is news, as an empty camera folder is
                collected.append(list_path)
                preset[list_path] = f"{list_path}: the list file names no images (empty, or only comments)"
            for number, line in lines:
                _expand_one(line, os.path.dirname(list_path), collected, preset, stand_ins,
                            f" (line {number} of {list_path})")
        else:
            _expand_one(spec, None, collected, preset, stand_ins)
    unique = sorted(set(collected))
    return Inputs(unique, {p: preset[p] for p in unique if p in preset}, len(collected) - len(unique), stand_ins)


def chunk_id(paths: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def make_chunks(paths: Sequence[str], chunk_size: int = CHUNK_SIZE) -> list[list[str]]:
    """Fixed-size consecutive chunks of an (already sorted) list: deterministic."""
    if chunk_size < 1:
        raise ValueError("chunk size must be >= 1")
    return [list(paths[i: i + chunk_size]) for i in range(0, len(paths), chunk_size)]
