"""Make sure every node sees the driver's OUT and DATA_ROOT before (and while) train-all trains.

On a cluster, training tasks read DATA_ROOT and write their bundles to OUT themselves, so both
must be the same directory on every node (NFS, a mounted bucket, a shared PVC). A path that is
only on the driver's local disk would otherwise "work": each task would write its bundle to its
own node's disk, where the driver and everyone else never find it.

The driver writes a probe file with a random token into OUT. Before training, a zero-CPU task
pinned to each alive node reads it back (and compares its listing of each trained category's
train/good with the driver's); any node that cannot is named in
a clear error and nothing is trained. Every training task checks the probe again before it
starts, which also covers nodes that join later (autoscaling).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_PREFIX = ".pni-ray-shared-storage-"


class SharedStorageError(RuntimeError):
    """OUT or DATA_ROOT is not visible from some node (names the node and the path)."""


@dataclass(frozen=True)
class Probe:
    """A file in OUT whose token proves that a node sees the driver's OUT, not a local look-alike."""

    path: str
    token: str
    data_root: str
    # (category, files in its train/good: names and sizes, as data_listing gives them) for the categories
    # this run trains: a node whose DATA_ROOT is another copy (empty, stale) lists something else
    listing: tuple[tuple[str, str], ...] = ()

    @classmethod
    def write(cls, out: Path, data_root: Path, categories: tuple[str, ...] = ()) -> "Probe":
        remove_dead_probes(out)
        token = secrets.token_hex(16)
        path = out / f"{PROBE_PREFIX}{token[:12]}.json"
        from pni_ray.fileio import atomic_write_json  # pyarrow-free start-up for the CLI

        atomic_write_json(path, {"token": token, "host": socket.gethostname(), "pid": os.getpid()})
        listing = tuple((c, data_listing(Path(data_root), c)) for c in sorted(set(categories)))
        return cls(str(path), token, str(data_root), listing)

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def remove_dead_probes(out: Path) -> list[Path]:
    """Probe files a killed driver on this host left in OUT (its pid gone); a live run's, or another
    host's, stay. Returns what was removed."""
    removed = []
    for path in Path(out).glob(f"{PROBE_PREFIX}*.json"):
        try:
            meta = json.loads(path.read_text())
            pid = int(meta["pid"])
            if meta.get("host") != socket.gethostname():
                continue
            os.kill(pid, 0)  # raises when no such process
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, or alive but another user's: left
            continue
    return removed


def data_listing(data_root: Path, category: str) -> str:
    """What this node sees of `category`'s training images: the count, and a digest of the file names
    and sizes in its train/good (cheap: no image is read); "missing" without that folder."""
    folder = data_root / category / "train" / "good"
    try:
        entries = sorted((e.name, e.stat().st_size) for e in os.scandir(folder) if e.is_file())
    except OSError:
        return "missing"
    digest = hashlib.sha256("\n".join(f"{name}\t{size}" for name, size in entries).encode()).hexdigest()[:16]
    return f"{len(entries)} files, {digest}"


def probe_problem(probe: Probe, category: str | None = None) -> str | None:
    """Why this process's node cannot use the driver's OUT / DATA_ROOT, or None when it can. `category`:
    only its train/good is compared (a task's own); without it, every category the run trains (the
    pre-flight check on each node, where any task may land)."""
    out = str(Path(probe.path).parent)
    try:
        token = json.loads(Path(probe.path).read_text()).get("token")
    except (OSError, ValueError) as exc:
        return (f"output directory {out} is not the driver's: cannot read its probe file "
                f"{Path(probe.path).name} ({type(exc).__name__}: {exc})")
    if token != probe.token:
        return f"output directory {out} is a different directory from the driver's (probe token differs)"
    if not Path(probe.data_root).is_dir():
        return f"data root {probe.data_root} does not exist here"
    for name, driver_sees in probe.listing:
        if category is not None and name != category:
            continue
        here = data_listing(Path(probe.data_root), name)
        if here != driver_sees:
            return (f"data root {probe.data_root} is not the driver's here: its {name}/train/good holds "
                    f"{here} where the driver's holds {driver_sees}")
    return None


def _check_here(probe: Probe) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "problem": probe_problem(probe)}


def check_all_nodes(probe: Probe, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run the probe check on every alive node; raise SharedStorageError naming each node that fails."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(num_cpus=0, max_retries=0)(_check_here)
    refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                          name="pni-ray storage check").remote(probe): n for n in nodes}
    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    results, problems = [], []
    for ref in ready:
        node = refs[ref]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the node died meanwhile: its tasks will be retried elsewhere
            result = {"node_id": node["NodeID"], "host": None, "problem": None, "skipped": f"{type(exc).__name__}"}
        results.append(result)
        if result.get("problem"):
            problems.append(f"{result['host']} ({node.get('NodeManagerAddress')}, node {node['NodeID'][:8]}): "
                            f"{result['problem']}")
    for ref in not_ready:
        ray.cancel(ref, force=True)
        node = refs[ref]
        problems.append(f"{node.get('NodeManagerAddress')} (node {node['NodeID'][:8]}): no answer within {timeout_s:g} s")
    if problems:
        raise SharedStorageError(
            "train-all needs OUT and DATA_ROOT on storage shared by every node (the same path everywhere: NFS, a "
            "mounted bucket, a shared volume), because each task reads the images and writes its bundle itself. "
            "Not shared with:\n  " + "\n  ".join(problems)
        )
    return results
