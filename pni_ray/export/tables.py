"""The export directory's data side: Arrow tables, checksums and the exact mask thresholds.

Torch-free on purpose (numpy + pyarrow only): the edge runtime imports this module, and an edge
box may have no torch at all.

Exact mask thresholds
---------------------
The torch scorer decides whether a memory entry m may serve patch p at grid position x with

    p_n = probs[p, e2d[m]] * inv_cluster[m],  p_x = p(c_m | x)
    allowed = (p_n > tau_n) & (p_x > tau)                  (mode "pni", combine "both", the default)
    allowed = ((p_n + p_x) * 0.5) > tau                    (mode "pni", combine "mean", the paper)
    allowed = p_n > tau_n                                  (mode "neighbourhood", pni_split's first half)

(tau_n: p(c|N)'s own cut, the bundle's neighbourhood_cut x tau)

in float32 (torch compares a float32 tensor with a Python float in float32). For fixed (x, m)
each is a monotone non-decreasing function of g = probs[p, e2d[m]] (a product by a positive
number, a sum and a halving are each monotone under round-to-nearest; "both" is p_n > tau where
p_x > tau and False elsewhere), so the set of float32 values g that pass is {g >= T[x, m]} for
one float32 threshold T (+inf where nothing passes). We find T by a binary search over float32
bit patterns, evaluating the *same* float32 expression, so

    G >= T   <=>   the torch expression is True        (bit for bit, for every g in [0, 1])

The exported graph then needs a single comparison per (patch, entry) instead of a multiply, an
add and a comparison over a (patches x |C_emb|) tensor -- two fewer passes over the largest
tensor of the model, and nothing left for a backend to contract into an FMA or re-associate
(TensorRT fuses pointwise chains), which could otherwise flip entries that sit on the boundary.
Where p(c|x) is zero (most of the table) T only depends on m, so T is stored as a per-entry base
(+inf for "both") plus the entries of the sparse position prior.

The static position mask p_x > tau is kept too (modes position, pni_split, and pni's fallback
when its mask refuses every entry of a patch), with the torch scorer's last fallback built in: a
position whose prior allows nothing allows every entry (the plain minimum).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pni_ray.config import COMBINE_RULES, float_from_json
from pni_ray.fileio import atomic_write_json as write_json  # noqa: F401 (used as tables.write_json)
from pni_ray.fileio import read_arrow, read_manifest_json, sha256_file, write_arrow  # noqa: F401 (tables.read_arrow)

FORMAT = "pni-ray-export"
# 2: the export reads 16-bit grey on a white level or refuses letterbox content sizes (geometry.white_level,
# content_extent), which a reader of 1 would ignore without a word; one that uses neither is written as 1,
# which every reader takes
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

C_EMB = "c_emb.arrow"
C_DIST = "c_dist.arrow"
EMB_TO_DIST = "emb_to_dist.arrow"
PRIOR = "position_prior.arrow"
NORMALISATION = "normalisation.arrow"

ONE_BITS = np.int64(0x3F800000)  # float32 1.0: probabilities never exceed it
NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
HALF = np.float32(0.5)
PENALTY = np.float32(1e30)  # added to refused entries' distances in the scorer graph


class ExportError(ValueError):
    """An export directory that cannot be trusted or used; the message says which file and why."""


# ---------------------------------------------------------------------------- files and checksums


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file of `folder` except the manifest."""
    return {
        p.name: file_record(p)
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def file_record(path: Path) -> dict[str, Any]:
    """One file's entry in a manifest's `files`: its sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def is_batch_size(value: Any) -> bool:
    """A whole number >= 1: a batch loop stepping by less scores nothing."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The export's manifest, its sections checked against each other: every stage of `pipeline` is a
    graph of `graphs`, and `tables` names the normalisation table and the memory bank, so an edited
    manifest is refused here, naming the key, not later as a KeyError mid-run."""
    manifest = read_manifest_json(path, FORMAT, FORMAT_VERSION, ExportError, "export",
                                  hint=" (a training bundle? run `pni-ray export` on it)",
                                  required={"files": dict, "graphs": dict, "tables": dict, "pipeline": list,
                                            "scorer": dict, "mode": str, "tau": float})
    file = Path(path) / MANIFEST
    unknown = [name for name in manifest["pipeline"] if not isinstance(name, str) or name not in manifest["graphs"]]
    if unknown:
        raise ExportError(f"{file}: pipeline names {unknown!r:.80}, not a graph of 'graphs': the manifest was edited "
                          "or truncated; export the bundle again")
    if manifest["scorer"].get("coresets") not in ("constant", "input"):
        raise ExportError(f"{file}: scorer['coresets'] is {manifest['scorer'].get('coresets')!r:.40}, not 'constant' "
                          "or 'input': the manifest was edited or truncated; export the bundle again")
    batch = manifest.get("max_batch", 16)
    if not is_batch_size(batch):
        raise ExportError(f"{file}: max_batch is {batch!r:.40}, not a whole number >= 1: the manifest was edited; "
                          "export the bundle again")
    for table in ("c_emb", "normalisation"):
        if not isinstance(manifest["tables"].get(table), str):
            raise ExportError(f"{file}: tables[{table!r}] is missing: the manifest was edited or truncated; export the "
                              "bundle again")
    return manifest


# manifest fields that say where and with which tools an export was made, not what it computes
# (the graph and table files' sha256 do): left out of its identity
_NOT_IDENTITY = ("versions",)
_NOT_IDENTITY_SOURCE = ("path",)


def export_id(path: Path | str) -> str:
    """Identity of an export: the sha256 of its manifest (which pins every graph, table and engine
    file) without where its bundle lay or which tool versions wrote it, so the same bundle exported
    again from a copy, or after an upgrade that writes the same graphs, is the same model. Two exports
    of one bundle that compute differently (FP32 and INT8, another opset, TensorRT engines added)
    differ; the manifest's `model_id` is the source bundle's, their common lineage."""
    manifest = read_manifest(path)
    identity = {k: v for k, v in manifest.items() if k not in _NOT_IDENTITY}
    source = identity.get("source_bundle")
    if isinstance(source, dict):
        identity["source_bundle"] = {k: v for k, v in source.items() if k not in _NOT_IDENTITY_SOURCE}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def verify_export(path: Path | str) -> dict[str, Any]:
    """Every file the manifest lists exists with its sha256, and every graph's files are listed."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files", {})
    needed = set()
    for name, graph in manifest["graphs"].items():
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            raise ExportError(f"{path / MANIFEST}: graphs[{name!r}] names no file: the manifest was edited or "
                              "truncated; export the bundle again")
        needed.add(graph["file"])
        needed.update(graph.get("external_data", []))
    needed.update(manifest.get("tables", {}).values())
    missing = sorted(needed - set(files))
    if missing:
        raise ExportError(f"{path}: incomplete export, manifest lists no {', '.join(missing)}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise ExportError(f"{file}: missing from the export (listed in {MANIFEST})")
        digest = sha256_file(file)
        if digest != meta["sha256"]:
            raise ExportError(
                f"{file}: checksum mismatch (expected {meta['sha256'][:12]}..., got {digest[:12]}...): "
                "the file was modified or corrupted; export the bundle again"
            )
    return manifest


# ---------------------------------------------------------------------------- Arrow tables


def c_emb_table(memory: np.ndarray) -> pa.Table:
    n, d = memory.shape
    flat = pa.array(np.ascontiguousarray(memory, dtype=np.float32).reshape(-1), type=pa.float32())
    schema = pa.schema(
        [("index", pa.int32()), ("vector", pa.list_(pa.float32(), d))],
        metadata={"feature_dim": str(d), "rows": str(n),
                  "doc": "C_emb: the memory bank in greedy k-center order (row i = rank i)"},
    )
    return pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int32)), pa.FixedSizeListArray.from_arrays(flat, d)],
                                schema=schema)


def c_dist_table(dist_size: int) -> pa.Table:
    """C_dist is the first dist_size rows of C_emb; stored as indices, the vectors live once."""
    idx = np.arange(dist_size, dtype=np.int32)
    schema = pa.schema([("index", pa.int32()), ("emb_index", pa.int32())],
                       metadata={"rows": str(dist_size), "doc": "C_dist entry k is the C_emb row emb_index"})
    return pa.Table.from_arrays([pa.array(idx), pa.array(idx)], schema=schema)


def emb_to_dist_table(emb_to_dist: np.ndarray) -> pa.Table:
    e2d = np.asarray(emb_to_dist, dtype=np.int32)
    sizes = np.bincount(e2d, minlength=int(e2d.max()) + 1).astype(np.int32)
    schema = pa.schema([("emb_index", pa.int32()), ("dist_index", pa.int32()), ("cluster_size", pa.int32())],
                       metadata={"doc": "p(c_emb | N) = p(c_dist[dist_index] | N) / cluster_size"})
    return pa.Table.from_arrays([pa.array(np.arange(len(e2d), dtype=np.int32)), pa.array(e2d), pa.array(sizes[e2d])],
                                schema=schema)


def prior_table(grid: tuple[int, int], n_entries: int, position: np.ndarray, entry: np.ndarray,
                prob: np.ndarray) -> pa.Table:
    schema = pa.schema(
        [("position", pa.int32()), ("entry", pa.int32()), ("prob", pa.float32())],
        metadata={"grid_h": str(grid[0]), "grid_w": str(grid[1]), "n_entries": str(n_entries),
                  "doc": "sparse p(c_emb | x): row-major grid position, C_emb index, probability"},
    )
    return pa.Table.from_arrays([pa.array(np.asarray(position, np.int32)), pa.array(np.asarray(entry, np.int32)),
                                 pa.array(np.asarray(prob, np.float32))], schema=schema)


def normalisation_table(norm: dict[str, Any]) -> pa.Table:
    cols = {k: [float_from_json(k, norm[k])] for k in ("image_mean", "image_std", "pixel_mean", "pixel_std", "threshold")}
    for k, v in sorted((norm.get("extras") or {}).items()):
        cols[f"extra.{k}"] = [float_from_json(k, v)]
    return pa.table({k: pa.array(v, type=pa.float64()) for k, v in cols.items()},
                    metadata={"doc": "maps normalise as (map - pixel_mean) / pixel_std; "
                                     "an image is anomalous when its raw score exceeds threshold"})


def read_normalisation(path: Path) -> dict[str, float]:
    row = read_arrow(path).to_pylist()[0]
    return {k: float(v) for k, v in row.items()}


@dataclass
class ScoringTables:
    """What the scorer needs, read from the Arrow tables (numpy, no torch)."""

    memory: np.ndarray  # (M, D) float32
    emb_to_dist: np.ndarray | None  # (M,) int64
    inv_cluster: np.ndarray | None  # (M,) float32, exactly torch's 1 / sizes[e2d]
    grid: tuple[int, int]
    prior_position: np.ndarray | None
    prior_entry: np.ndarray | None
    prior_prob: np.ndarray | None

    @classmethod
    def read(cls, folder: Path) -> "ScoringTables":
        folder = Path(folder)
        emb = read_arrow(folder / C_EMB)
        d = int(emb.schema.metadata[b"feature_dim"])
        memory = emb.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d).astype(np.float32)
        e2d = inv = None
        if (folder / EMB_TO_DIST).is_file():
            t = read_arrow(folder / EMB_TO_DIST)
            e2d = t.column("dist_index").to_numpy().astype(np.int64)
            inv = (np.float32(1.0) / t.column("cluster_size").to_numpy().astype(np.float32)).astype(np.float32)
        pos = ent = prob = None
        grid = (0, 0)
        if (folder / PRIOR).is_file():
            pt = read_arrow(folder / PRIOR)
            grid = (int(pt.schema.metadata[b"grid_h"]), int(pt.schema.metadata[b"grid_w"]))
            pos = pt.column("position").to_numpy().astype(np.int64)
            ent = pt.column("entry").to_numpy().astype(np.int64)
            prob = pt.column("prob").to_numpy().astype(np.float32)
        return cls(memory, e2d, inv, grid, pos, ent, prob)


# ---------------------------------------------------------------------------- exact mask thresholds


def tau32(tau: float) -> np.float32:
    """torch compares float32 tensors with a Python float in float32."""
    return np.float32(tau)


def predicate(mode: str, g: np.ndarray, inv: np.ndarray, p_x: np.ndarray | float, tau: float,
              combine: str = "both", tau_n: float | None = None) -> np.ndarray:
    """The torch scorer's float32 mask expression for probabilities g (see the module doc); tau_n:
    p(c|N)'s own cut where it masks alone or beside p(c|x) ("both"), tau when None."""
    g = np.asarray(g, np.float32)
    p_n = g * np.asarray(inv, np.float32)
    t = tau32(tau)
    t_n = t if tau_n is None else tau32(tau_n)
    if mode == "pni":
        p_x = np.asarray(p_x, np.float32)
        if combine == "both":
            return (p_n > t_n) & (p_x > t)
        if combine == "mean":
            return ((p_n + p_x) * HALF) > t
        raise ValueError(f"unknown prior combination {combine!r}; choose from {COMBINE_RULES}")
    if mode in ("neighbourhood", "pni_split"):
        return p_n > t_n
    raise ValueError(f"mode {mode!r} has no probability-dependent mask")


def exact_thresholds(mode: str, inv: np.ndarray, p_x: np.ndarray | float, tau: float,
                     combine: str = "both", tau_n: float | None = None) -> np.ndarray:
    """Smallest float32 g in [0, 1] with predicate(g) True, -inf if g = 0 passes, +inf if 1 fails.

    Vectorised binary search over float32 bit patterns (non-negative floats order like their bits).
    """
    inv = np.asarray(inv, np.float32)
    p_x = np.broadcast_to(np.asarray(p_x, np.float32), inv.shape)

    def passes(bits: np.ndarray) -> np.ndarray:
        return predicate(mode, bits.astype(np.int32).view(np.float32), inv, p_x, tau, combine, tau_n)

    zero = np.zeros(inv.shape, np.int64)
    one = np.full(inv.shape, ONE_BITS, np.int64)
    at0, at1 = passes(zero), passes(one)
    lo, hi = zero.copy(), one.copy()  # invariant (where searching): passes(hi), not passes(lo)
    active = ~at0 & at1
    while True:
        gap = active & (hi - lo > 1)
        if not gap.any():
            break
        mid = (lo + hi) // 2
        ok = passes(mid)
        hi = np.where(gap & ok, mid, hi)
        lo = np.where(gap & ~ok, mid, lo)
    out = hi.astype(np.int32).view(np.float32).copy()
    out[at0] = NEG_INF
    out[~at1] = POS_INF
    return out


@dataclass
class MaskSpec:
    """The scorer's masks as graph-ready constants, per scoring mode.

    threshold_base (M,) + (threshold_index, threshold_value) sparse: allowed = G >= T[x, m] with
    T = base everywhere except at the flat indices x * M + m (modes pni / neighbourhood /
    pni_split; `combine` is the pni rule they encode). position_index: flat indices x * M + m
    where p(c|x) > tau (modes position / pni_split, and pni's fallback), the static mask.
    """

    mode: str
    hw: int
    n_memory: int
    combine: str = "both"
    threshold_base: np.ndarray | None = None
    threshold_index: np.ndarray | None = None
    threshold_value: np.ndarray | None = None
    position_index: np.ndarray | None = None
    position_prob: np.ndarray | None = None

    def dense_threshold(self) -> np.ndarray:
        """(hw, M) float32, or (1, M) when the threshold does not depend on the position."""
        assert self.threshold_base is not None
        if self.threshold_index is None:
            return self.threshold_base.reshape(1, -1).copy()
        out = np.broadcast_to(self.threshold_base, (self.hw, self.n_memory)).reshape(-1).copy()
        out[self.threshold_index] = self.threshold_value
        return out.reshape(self.hw, self.n_memory)

    def position_rows_empty(self) -> np.ndarray:
        """(hw,) bool: positions whose prior allows no entry at all."""
        assert self.position_index is not None
        return np.bincount(self.position_index // self.n_memory, minlength=self.hw) == 0

    def dense_position_mask(self) -> np.ndarray:
        """(hw, M) bool: p(c|x) > tau, every entry where a position allows none (the plain minimum)."""
        out = np.zeros(self.hw * self.n_memory, bool)
        out[self.position_index] = True
        out = out.reshape(self.hw, self.n_memory)
        out[self.position_rows_empty()] = True
        return out


def mask_spec(mode: str, tables: ScoringTables, tau: float, combine: str = "both",
              tau_n: float | None = None) -> MaskSpec:
    """The masks of `mode` (pni: under the `combine` rule) at tau (p(c|N): tau_n, tau when None),
    from the scoring tables."""
    if combine not in COMBINE_RULES:
        raise ExportError(f"unknown prior combination {combine!r}; choose from {COMBINE_RULES}")
    m = tables.memory.shape[0]
    hw = tables.grid[0] * tables.grid[1]
    spec = MaskSpec(mode=mode, hw=hw, n_memory=m, combine=combine)
    if mode == "patchcore":
        return spec
    if tables.inv_cluster is None:
        raise ExportError(f"mode {mode!r} needs the emb-to-dist map of a PNI bundle")
    if mode in ("neighbourhood", "pni", "pni_split"):
        base_mode = "pni" if mode == "pni" else "neighbourhood"
        spec.threshold_base = exact_thresholds(base_mode, tables.inv_cluster, 0.0, tau, combine, tau_n)
    if mode in ("pni", "position", "pni_split"):
        if tables.prior_prob is None:
            raise ExportError(f"mode {mode!r} needs the position prior of a PNI bundle")
        flat = tables.prior_position * m + tables.prior_entry
        order = np.argsort(flat, kind="stable")
        flat, entry, prob = flat[order], tables.prior_entry[order], tables.prior_prob[order]
        if mode == "pni":
            values = exact_thresholds("pni", tables.inv_cluster[entry], prob, tau, combine, tau_n)
            differs = values != spec.threshold_base[entry]
            spec.threshold_index, spec.threshold_value = flat[differs], values[differs]
        keep = prob > tau32(tau)
        spec.position_index, spec.position_prob = flat[keep], prob[keep]
    return spec


def candidate_table(masks: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each position's allowed entries (p(c|x) > tau), ascending, as an (hw, k) int64 table padded
    with the row's first entry, and the positions that allow none (rows of entry 0): the table
    torch's `pni_ray.models.scorer.position_candidates` builds, for the candidate scorer graph."""
    assert masks.position_index is not None
    pos, ent = np.divmod(masks.position_index, masks.n_memory)  # sorted by position, then entry
    counts = np.bincount(pos, minlength=masks.hw)
    k = max(int(counts.max()) if counts.size else 0, 1)
    starts = np.cumsum(counts) - counts
    first = np.zeros(masks.hw, np.int64)
    first[counts > 0] = ent[starts[counts > 0]]
    table = np.repeat(first[:, None], k, axis=1)
    table[pos, np.arange(pos.size) - starts[pos]] = ent
    return table, np.flatnonzero(counts == 0)


def candidate_thresholds(masks: MaskSpec, table: np.ndarray) -> np.ndarray:
    """(hw, k) float32 exact thresholds T[x, m] at the candidate entries of `table`."""
    assert masks.threshold_base is not None
    out = masks.threshold_base[table].astype(np.float32)
    if masks.threshold_index is not None and masks.threshold_index.size:
        flat = np.arange(masks.hw)[:, None] * masks.n_memory + table
        at = np.searchsorted(masks.threshold_index, flat).clip(max=masks.threshold_index.size - 1)
        hit = masks.threshold_index[at] == flat
        out[hit] = masks.threshold_value[at[hit]]
    return out


def scorer_table_values(mode: str, st: ScoringTables, tau: float, combine: str = "both",
                        tau_n: float | None = None) -> dict[str, np.ndarray]:
    """Inputs of a coresets-as-inputs scorer graph, computed exactly as the graph constants are.

    memory_neg2t (D, M), memory_sq (M,), emb_to_dist (M,), mask_threshold (M, 1, hw or 1):
    the transposed exact thresholds, position_penalty (hw, M): 0 where p(c|x) > tau (or the
    position allows nothing), else PENALTY.
    """
    memory = st.memory.astype(np.float32)
    out = {"memory_neg2t": np.ascontiguousarray(np.float32(-2.0) * memory.T),
           "memory_sq": (memory * memory).sum(1, dtype=np.float32)}
    masks = mask_spec(mode, st, tau, combine, tau_n)
    if mode in ("neighbourhood", "pni", "pni_split"):
        out["emb_to_dist"] = st.emb_to_dist.astype(np.int64)
        out["mask_threshold"] = np.ascontiguousarray(masks.dense_threshold().T[:, None, :])
    if mode in ("position", "pni", "pni_split"):
        out["position_penalty"] = np.where(masks.dense_position_mask(), np.float32(0), PENALTY).astype(np.float32)
    return out


def combine_rule(manifest: dict[str, Any]) -> str:
    """The pni combination rule an export's graphs were built with (exports before the rule: the mean)."""
    return str(manifest.get("combine", "mean"))


def neighbourhood_tau(manifest: dict[str, Any]) -> float:
    """p(c|N)'s cut an export's graphs were built with (exports before the chosen cut: tau)."""
    return float(manifest.get("tau_neighbourhood", manifest["tau"]))
