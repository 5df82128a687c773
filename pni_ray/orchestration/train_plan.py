"""Planning of `train-all`: which (category, backbone) pairs to train, skip or refuse, before any task starts.

Resume rules: a folder at a pair's bundle path that is not a bundle (no readable bundle manifest)
fails that pair at planning, naming what it holds; it is never deleted. A pair whose bundle exists and verifies (every checksum) with the same training
config is skipped unless ``--force`` (the MLP's precision compared as `trained_precision` says; the driver
evaluates a skipped bundle that has no metrics on record, see train_all); a bundle that fails verification is retrained; a verified
bundle trained with a different config is not overwritten without ``--force`` (that pair fails
with the differing keys named; the refiner's settings count only when a refiner was trained or is
asked for). Stale temp directories of a killed save are removed before
retraining.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pni_ray.bundle_manifest import position_check_outcome
from pni_ray.config import TrainConfig

TRAINED, SKIPPED, FAILED = "trained", "skipped", "failed"


@dataclass(frozen=True)
class Pair:
    """One unit of work: a category trained with one backbone, bundled at OUT/<category>/<backbone>."""

    category: str
    backbone: str

    @property
    def key(self) -> str:
        return f"{self.category}/{self.backbone}"

    def bundle(self, out: Path) -> Path:
        return out / self.category / self.backbone


NEW = "new"  # a PlanItem's reason where OUT holds no bundle for the pair


@dataclass
class PlanItem:
    """What the driver decided for a pair, and why (shown in the summary's `reason`)."""

    pair: Pair
    action: str  # "train" | "skip" | "fail"; the driver turns a "skip" without metrics into "evaluate"
    reason: str
    model_id: str | None = None


def pair_config(cfg: TrainConfig, backbone: str) -> TrainConfig:
    """The run's config with this pair's backbone."""
    return cfg.replace(features=dataclasses.replace(cfg.features, backbone=backbone))


def canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float spellings compare as a manifest stores them."""
    return json.loads(json.dumps(obj, sort_keys=True))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return keys


def _refiners_compared(recorded: dict[str, Any], wanted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two configs as they shape the bundle: where either side has no refiner (`refiner.enabled`
    false) the refiner's other settings train nothing there, so only `enabled` is compared (a changed
    refiner default never makes a refiner-less bundle different, and asking for a refiner says so first)."""
    sides = (recorded.get("refiner"), wanted.get("refiner"))
    if all(isinstance(r, dict) for r in sides) and False in (sides[0].get("enabled"), sides[1].get("enabled")):
        return ({**recorded, "refiner": {"enabled": sides[0].get("enabled")}},
                {**wanted, "refiner": {"enabled": sides[1].get("enabled")}})
    return recorded, wanted


def recorded_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """A bundle's config with the fields added since it was written filled in as it trained
    (`TrainConfig.from_manifest`: pni_ray.config.LEGACY_SECTIONS), so a new field alone never
    makes a bundle "different", and one that trained otherwise still is; a scoring mode the position check
    changed is compared as it was asked for. A config this version cannot read is compared as stored."""
    raw = manifest.get("config", {})
    requested = manifest["training"]["position_check"].get("requested_mode") \
        if position_check_outcome(manifest) == "dropped" else None
    if requested and isinstance(raw.get("scoring"), dict):
        # the position check left p(c|x) out of the scoring mode it records: compare the mode that was asked for
        raw = {**raw, "scoring": {**raw["scoring"], "mode": requested}}
    try:
        return TrainConfig.from_manifest(raw).to_dict()
    except (TypeError, ValueError):
        return raw


def trained_precision(manifest: dict[str, Any], recorded: dict[str, Any], wanted: str) -> str:
    """The MLP precision to compare with the wanted one: any precision satisfies "auto" (bf16 or
    float32 is what auto gives on some CPU, and both score the same to 4 decimals), and any
    satisfies a patchcore bundle (it has no MLP); an explicit one must match what the bundle's MLP
    trained in (manifest training.mlp.precision, or the config's value for bundles that trained
    before "auto" existed)."""
    if wanted == "auto" or recorded.get("mode") == "patchcore":
        return wanted
    training = manifest.get("training")
    mlp = training.get("mlp") if isinstance(training, dict) else None
    ran = mlp.get("precision") if isinstance(mlp, dict) else None
    return ran or recorded.get("neighbourhood", {}).get("train_precision")


def plan_pairs(out: Path, pairs: list[Pair], cfg: TrainConfig, force: bool = False,
               threads: int | None = None) -> list[PlanItem]:
    """What to do with each pair: train, skip (verified bundle with this config; one of another torch thread
    count than `threads` is kept, and the reason says so: the count changes the bundle's floats) or fail."""
    from pni_ray.bundle import FORMAT, BundleError, model_id, verify_bundle
    from pni_ray.fileio import NotReplaceable, check_replaceable

    plan = []
    for pair in pairs:
        path = pair.bundle(out)
        if not path.exists() and not path.is_symlink():
            plan.append(PlanItem(pair, "train", NEW))
            continue
        try:  # what the save would refuse after training: refuse it now, and never delete it
            check_replaceable(path, FORMAT, "bundle", option="OUT")
        except NotReplaceable as exc:
            plan.append(PlanItem(pair, "fail", str(exc)))
            continue
        if force:
            plan.append(PlanItem(pair, "train", "forced (--force)"))
            continue
        try:
            manifest = verify_bundle(path)
        except BundleError as exc:
            plan.append(PlanItem(pair, "train", f"retrain: existing bundle failed verification: {exc}"))
            continue
        wanted = canonical(pair_config(cfg, pair.backbone).to_dict())
        recorded = canonical(recorded_config(manifest))
        if isinstance(recorded.get("neighbourhood"), dict) and "train_precision" in recorded["neighbourhood"]:
            recorded["neighbourhood"]["train_precision"] = trained_precision(
                manifest, recorded, wanted["neighbourhood"]["train_precision"])
        diff = config_diff(*_refiners_compared(recorded, wanted))
        if manifest.get("category") != pair.category:
            diff.insert(0, f"category: {manifest.get('category')!r} -> {pair.category!r}")
        if diff:
            shown = "; ".join(diff[:6]) + (f"; ... {len(diff) - 6} more" if len(diff) > 6 else "")
            plan.append(PlanItem(
                pair, "fail",
                f"{path} is a valid bundle trained with a different config ({shown}); "
                "use --force to retrain it or another --out",
            ))
            continue
        ran = (manifest.get("training") or {}).get("torch_threads")
        note = ""  # evaluating it needs no retraining; only its floats would differ from this run's
        if threads is not None and ran != threads:
            note = (f" (trained on {ran} torch threads, this run asks {threads}: its floats differ from what this run "
                    f"would train; --force retrains it, --threads {ran} matches it)")
        plan.append(PlanItem(pair, "skip", "verified bundle with this config" + note, model_id(path)))
    return plan
