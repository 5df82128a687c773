"""p(c | N_p(x)): which C_dist entry the centre patch should be, judged from its neighbours.

A linear layer over the concatenated p x p window minus the centre is exactly a p x p
convolution whose centre tap is zero, so the MLP runs densely over a whole feature map in
one pass (fast on CPU, one ONNX Conv for export) instead of once per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pni_ray.config import NeighbourhoodConfig


class MaskedWindowConv(nn.Conv2d):
    """p x p convolution that never reads the centre position's own features.

    As in the paper, its neighbours' features are the p x p-aggregated patch features, so each adjacent
    neighbour still holds 1 / p^2 of the centre cell's backbone feature (and the backbone's receptive field,
    ~107 px at stride 8, spans the whole window): p(c|N) is conditioned on the centre cell's grid entry
    only in that diluted way."""

    def __init__(self, in_channels: int, out_channels: int, window: int) -> None:
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        super().__init__(in_channels, out_channels, window, padding=window // 2, bias=True)
        mask = torch.ones(1, 1, window, window)
        mask[..., window // 2, window // 2] = 0.0
        self.register_buffer("centre_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.centre_mask, self.bias, padding=self.padding)


class NeighbourhoodMLP(nn.Module):
    """Features (B, D, h, w) -> logits over C_dist (B, K, h, w) from each position's neighbours.

    Borders: the grid is zero-padded, and a validity channel (1 inside the image, 0 outside)
    goes with the features, so the network can tell "outside the image" from "zero feature".
    """

    def __init__(self, feature_dim: int, n_classes: int, cfg: NeighbourhoodConfig) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.n_classes = n_classes
        self.temperature = cfg.temperature
        width = cfg.bottleneck or feature_dim  # None: each neighbour's whole feature (the paper)
        self.reduce = nn.Conv2d(feature_dim, width, 1)
        self.window = MaskedWindowConv(width + 1, cfg.hidden, cfg.window)
        layers: list[nn.Module] = []
        for _ in range(cfg.depth):
            layers += [nn.Conv2d(cfg.hidden, cfg.hidden, 1), nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True)]
        self.hidden = nn.Sequential(nn.BatchNorm2d(cfg.hidden), nn.ReLU(inplace=True), *layers)
        self.classifier = nn.Conv2d(cfg.hidden, n_classes, 1)

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, hidden, h, w): everything before the classifier."""
        reduced = F.relu(self.reduce(features))
        valid = torch.ones_like(reduced[:, :1])
        return self.hidden(self.window(torch.cat([reduced, valid], dim=1)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden_features(features))

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) channels-last rows -> (..., K) logits: the classifier as one matrix product
        over contiguous rows (training steps, validation, `probabilities`)."""
        return F.linear(hidden, self.classifier.weight.flatten(1), self.classifier.bias)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax with the paper's temperature over the class axis: (B, K, h, w).

        Stored channels-last (a permuted view): the softmax then runs over contiguous memory and
        the scorer's one-row-per-patch view needs no copy (2x less time than dim=1 on NCHW),
        as in the exported MLP graph.
        """
        hidden = self.hidden_features(features).permute(0, 2, 3, 1)
        logits = self.classify(hidden)  # (B, h, w, K) contiguous
        return torch.softmax(logits / self.temperature, dim=-1).permute(0, 3, 1, 2)


def choose_cut(
    p_nearest: torch.Tensor, tau: float, candidates: tuple[float, ...], min_keep: float
) -> tuple[float, dict[float, float]]:
    """How hard p(c|N) may mask: the largest cut (a multiple of tau, never below 1) under which
    held-out good patches keep their nearest C_emb entry allowed (p_nearest > cut x tau) at a rate
    of at least `min_keep`.

    The same rule as the position prior's spread, on training images only: a confident MLP (its
    probability mass on the right entries) gets a strict mask that vetoes implausible entries for
    defects, an unsure one stays at tau. p_nearest: p(c|N) of each held-out patch's nearest entry;
    empty (no held-out images) gives tau. Returns the cut and every keep rate measured.
    """
    ordered = sorted({float(c) for c in candidates} | {1.0})
    if ordered[0] < 1.0:
        raise ValueError(f"neighbourhood cut candidates must be >= 1 (multiples of tau), got {candidates}")
    if p_nearest.numel() == 0:
        return 1.0, {}
    rates = {c: float((p_nearest > c * tau).double().mean()) for c in ordered}
    passing = [c for c in ordered if rates[c] >= min_keep]
    return (max(passing) if passing else 1.0), rates
