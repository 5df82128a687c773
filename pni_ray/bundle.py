"""Model bundles: a directory of Arrow tables, safetensors and a checksummed JSON manifest.

No pickles anywhere. A bundle is written into a temporary sibling directory and renamed into
place, so a crash never leaves a half-written bundle under the final name; loading verifies
every file's sha256 and refuses anything tampered with or incomplete.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import pni_ray
from pni_ray.config import TrainConfig
from pni_ray.bundle_manifest import (FORMAT, FORMAT_VERSION, MANIFEST, MEMORY, MLP, PRIOR, REFINER,  # noqa: F401
                                     BundleError, check_weights_file, model_id, read_manifest, read_verified,
                                     verify_bundle)
from pni_ray.fileio import arrow_from_bytes, atomic_write_bytes, atomic_write_json, sha256_file, staged_dir, write_arrow
from pni_ray.geometry import grid_of
from pni_ray.models.backbones import get_spec, offline_weight_path
from pni_ray.models.neighbourhood import NeighbourhoodMLP
from pni_ray.models.pni import Normalisation, TrainedModel
from pni_ray.models.position_prior import SparsePositionPrior


def memory_table(memory: torch.Tensor, emb_to_dist: torch.Tensor | None, dist_size: int) -> pa.Table:
    """One row per C_emb vector with its greedy rank; rows with rank < dist_size form C_dist."""
    n, d = memory.shape
    flat = pa.array(memory.detach().float().contiguous().numpy().reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, d)
    dist_index = emb_to_dist.int().numpy() if emb_to_dist is not None else np.full(n, -1, np.int32)
    schema = pa.schema(
        [("rank", pa.int32()), ("vector", pa.list_(pa.float32(), d)), ("dist_index", pa.int32())],
        metadata={"feature_dim": str(d), "dist_size": str(dist_size)},
    )
    return pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int32)), vectors, pa.array(dist_index)], schema=schema)


def prior_table(prior: SparsePositionPrior) -> pa.Table:
    schema = pa.schema(
        [("position", pa.int32()), ("entry", pa.int32()), ("prob", pa.float32())],
        metadata={"grid_h": str(prior.grid[0]), "grid_w": str(prior.grid[1]), "n_entries": str(prior.n_entries)},
    )
    return pa.Table.from_arrays(
        [pa.array(prior.position.numpy()), pa.array(prior.entry.numpy()), pa.array(prior.prob.numpy())], schema=schema
    )


def backbone_record(cfg: TrainConfig) -> dict[str, Any]:
    """Where the backbone weights came from, with a checksum where there is a file to hash."""
    spec = get_spec(cfg.features.backbone)
    record: dict[str, Any] = {"name": spec.name, "timm_name": spec.timm_name, "mean": spec.mean, "std": spec.std}
    if cfg.features.weights:
        record.update(source="file", path=str(cfg.features.weights), sha256=sha256_file(Path(cfg.features.weights)))
    elif not cfg.features.pretrained:
        record.update(source="random-init-seed-0", sha256=None)
    elif spec.weight_package:
        path = offline_weight_path(spec)
        record.update(source=spec.weight_package, path=path.name, sha256=sha256_file(path))
    else:
        record.update(source="timm-hub", sha256=None)
    return record


def versions() -> dict[str, str]:
    import timm

    return {
        "pni_ray": pni_ray.__version__,
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def save_bundle(trained: TrainedModel, out: Path | str, overwrite: bool = False) -> Path:
    """Write the bundle atomically; returns its path. Same model -> byte-identical files.

    overwrite replaces an existing bundle (or an empty directory) only: any other directory or
    file at `out` raises fileio.NotReplaceable and is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (written while this one ran?); pass --force (overwrite=True) "
                              "to replace it")
    with staged_dir(out, FORMAT, "bundle", overwrite) as tmp:
        write_arrow(tmp / MEMORY, memory_table(trained.memory, trained.emb_to_dist, trained.dist_size))
        if trained.position_prior is not None:
            write_arrow(tmp / PRIOR, prior_table(trained.position_prior))
        # safetensors' save_file creates its file 0600 (unreadable to other users of a shared bundle
        # store); its bytes written here get the umask's mode, like every other bundle file, and an fsync
        if trained.mlp is not None:
            atomic_write_bytes(tmp / MLP, save_tensors({k: v.contiguous() for k, v in trained.mlp.state_dict().items()}))
        if trained.refiner is not None:
            atomic_write_bytes(tmp / REFINER,
                               save_tensors({k: v.contiguous() for k, v in trained.refiner.state_dict().items()}))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "category": trained.category,
            "mode": trained.config.mode,
            "config": trained.config.to_dict(),
            "backbone": backbone_record(trained.config),
            "feature_dim": trained.feature_dim,
            "grid": list(trained.grid),
            **({} if trained.content_extent is None else {"content_extent": [list(e) for e in trained.content_extent]}),
            "n_memory": int(trained.memory.shape[0]),
            "dist_size": trained.dist_size,
            "neighbourhood_cut": trained.neighbourhood_cut,
            "normalisation": asdict(trained.normalisation),
            "threshold": trained.normalisation.threshold,
            "training": trained.report.get("deterministic", {}),
            "versions": versions(),
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


def load_bundle(path: Path | str) -> tuple[TrainedModel, dict[str, Any]]:
    """Verify and load; backbone weights are checked against the recorded checksum."""
    trained, manifest, _ = load_bundle_and_id(path)
    return trained, manifest


def load_bundle_and_id(path: Path | str) -> tuple[TrainedModel, dict[str, Any], str]:
    """`load_bundle` and the model_id of the manifest it loaded: taken from the bytes read, not from the path again, so
    a bundle replaced meanwhile is never reported under the other one's id (`bundle_manifest.read_verified`)."""
    path = Path(path)
    verified = read_verified(path)
    manifest = verified.manifest
    try:
        cfg = TrainConfig.from_manifest(manifest["config"])
    except (TypeError, ValueError) as exc:  # a hand-edited config, or one a later pni-ray refuses: name it
        raise BundleError(f"{path / 'manifest.json'}: its config cannot be read ({exc}); retrain the bundle") from exc
    recorded = manifest["backbone"].get("sha256")
    check_weights_file(path, manifest)  # a --weights file: there and unchanged
    if recorded is not None and not cfg.features.weights:  # the registry's offline weights
        current = backbone_record(cfg).get("sha256")
        if current != recorded:
            raise BundleError(
                f"{path}: backbone weights differ from those the bundle was trained with "
                f"({manifest['backbone'].get('source')}: expected sha256 {recorded[:12]}..., found {str(current)[:12]}...)"
            )
    try:  # a manifest edited to disagree with its files (a size in config, a key in metadata): named, not a traceback
        trained = _model_from_files(verified.files, manifest, cfg)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path / MANIFEST}: the bundle's files cannot be read as it describes them ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); an edited manifest: restore or retrain the bundle "
                          "(if it was not edited, report this with the bundle)") from exc
    _check_agrees(path / MANIFEST, manifest, cfg, trained)
    return trained, manifest, verified.model_id


def _check_agrees(file: Path, manifest: dict[str, Any], cfg: TrainConfig, trained: TrainedModel) -> None:
    """The manifest's own facts against its config and its checked files. The checksums cannot catch an edit of the
    manifest itself (it is their root), and an edited `grid` or `mode` loads and then scores wrongly or fails far away."""
    facts = [("mode", manifest["mode"], cfg.mode, "its config's mode"),
             ("n_memory", manifest.get("n_memory", len(trained.memory)), len(trained.memory), f"the rows of {MEMORY}"),
             ("feature_dim", manifest.get("feature_dim", trained.feature_dim), trained.feature_dim, f"{MEMORY}'s width"),
             ("dist_size", manifest.get("dist_size", trained.dist_size), trained.dist_size, f"{MEMORY}'s dist_size")]
    size = cfg.features.image_size
    if trained.position_prior is not None:
        facts.append(("grid", list(manifest["grid"]), list(trained.position_prior.grid), f"{PRIOR}'s grid"))
    elif cfg.geometry.policy == "resize" and not cfg.geometry.tile:  # a fixed canvas: its grid follows from the size
        facts.append(("grid", list(manifest["grid"]), list(grid_of((size, size))), f"the grid of its {size} px input"))
    for key, stated, found, what in facts:
        if stated != found:
            raise BundleError(f"{file}: {key!r} is {stated!r} but {what} is {found!r}; the manifest was edited: restore or "
                              "retrain the bundle")


def _model_from_files(files: dict[str, bytes], manifest: dict[str, Any], cfg: TrainConfig) -> TrainedModel:
    """The memory bank, C_dist map, priors and networks of a verified bundle (its files' checked bytes), as its
    manifest describes them."""
    table = arrow_from_bytes(files[MEMORY])
    d = int(table.schema.metadata[b"feature_dim"])
    dist_size = int(table.schema.metadata[b"dist_size"])
    memory = torch.from_numpy(table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d).copy())
    dist_index = table.column("dist_index").to_numpy()
    emb_to_dist = torch.from_numpy(dist_index.astype(np.int64)) if dist_size > 0 else None
    prior = mlp = None
    if PRIOR in manifest["files"]:
        pt = arrow_from_bytes(files[PRIOR])
        meta = pt.schema.metadata
        prior = SparsePositionPrior(
            grid=(int(meta[b"grid_h"]), int(meta[b"grid_w"])),
            n_entries=int(meta[b"n_entries"]),
            position=torch.from_numpy(pt.column("position").to_numpy().copy()),
            entry=torch.from_numpy(pt.column("entry").to_numpy().copy()),
            prob=torch.from_numpy(pt.column("prob").to_numpy().copy()),
        )
    if MLP in manifest["files"]:
        mlp = NeighbourhoodMLP(d, dist_size, cfg.neighbourhood)
        mlp.load_state_dict(load_tensors(files[MLP]))
        mlp.eval()
    refiner = None
    if REFINER in manifest["files"]:
        from pni_ray.models.refiner import build_refiner

        refiner = build_refiner(cfg.refiner, pretrained=False)
        refiner.load_state_dict(load_tensors(files[REFINER]))
        refiner.eval()
    return TrainedModel(
        category=manifest["category"],
        config=cfg,
        memory=memory,
        dist_size=dist_size,
        emb_to_dist=emb_to_dist,
        position_prior=prior,
        mlp=mlp,
        normalisation=Normalisation.from_record(manifest["normalisation"]),
        grid=tuple(manifest["grid"]),  # type: ignore[arg-type]
        feature_dim=d,
        refiner=refiner,
        neighbourhood_cut=float(manifest.get("neighbourhood_cut", 1.0)),  # bundles before the cut: tau
        content_extent=(None if manifest.get("content_extent") is None  # bundles before it: unchecked
                        else tuple(tuple(int(v) for v in e) for e in manifest["content_extent"])),  # type: ignore[arg-type]
        # the training facts travel with the model, so a bundle written from it (refine) keeps them
        report={"deterministic": copy.deepcopy(manifest.get("training") or {})},
    )
