"""What the paper's full-size neighbourhood MLP would cost here, next to the default one.

The paper's p(c | N) is an MLP of 10 fully connected layers of 2048 units over the 80
neighbour features of a 9 x 9 window, predicting |C_dist| = 2048 classes, trained on every
position. pni-ray's default (NeighbourhoodConfig) is a 1x1 bottleneck, a masked 9 x 9 window
layer and `depth` 1x1 layers, trained on every position of each image (`positions_per_image` None) each
epoch. This script times float32 Adam training steps of both (the default's MLP trains in bf16
where the CPU has it natively: NeighbourhoodConfig.train_precision), measured in one run at the same thread
count on random features of the bottle model's width, and projects one epoch over a bottle-size
category (188 memory images x 40 x 40 positions, --grid 40):

    .venv/bin/python benchmarks/bench_mlp_cost.py --threads 2

Both networks see the same number of positions per step; the default's window layer runs as a
convolution over the batch's whole grid (as in training), the paper's MLP on gathered windows.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from pni_ray.config import NeighbourhoodConfig
from pni_ray.models.neighbourhood import NeighbourhoodMLP


def paper_mlp(in_features: int, width: int, layers: int, n_classes: int) -> nn.Sequential:
    """The authors' layout: Linear + BatchNorm + ReLU blocks, then the classifier."""
    blocks: list[nn.Module] = []
    dim = in_features
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        dim = width
    blocks.append(nn.Linear(dim, n_classes))
    return nn.Sequential(*blocks)


def time_steps(step, n_steps: int) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - t) / n_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--feature-dim", type=int, default=168, help="efficientnet_lite2 stride-8 + stride-16 channels")
    ap.add_argument("--grid", type=int, default=40, help="feature grid side (320 px / 8, the default model)")
    ap.add_argument("--images", type=int, default=188, help="memory images of the category")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = NeighbourhoodConfig()
    d, g, k = args.feature_dim, args.grid, cfg.dist_size
    batch_images = cfg.batch_images
    feats = torch.randn(batch_images, d, g, g)
    labels = torch.randint(0, k, (batch_images * g * g,))

    ours = NeighbourhoodMLP(d, k, cfg)
    opt = torch.optim.Adam(ours.parameters(), lr=1e-3)
    n_pick = (cfg.positions_per_image or g * g) * batch_images  # None: every position, as training does

    def step_ours() -> None:
        hidden = ours.hidden_features(feats)
        rows = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
        pick = torch.randperm(rows.shape[0])[:n_pick]
        loss = F.cross_entropy(ours.classify(rows[pick]), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()

    window = cfg.window * cfg.window - 1
    theirs = paper_mlp(window * d, 2048, 10, k)
    opt2 = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    paper_batch = 512
    x = torch.randn(paper_batch, window * d)
    y = torch.randint(0, k, (paper_batch,))

    def step_theirs() -> None:
        loss = F.cross_entropy(theirs(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()

    s_ours = time_steps(step_ours, args.steps)
    s_theirs = time_steps(step_theirs, args.steps)
    per_pos_ours = s_ours / n_pick
    per_pos_theirs = s_theirs / paper_batch
    positions = args.images * g * g
    epoch_ours = s_ours * args.images / batch_images  # one step per batch of images
    epoch_theirs = per_pos_theirs * positions  # the paper trains on every position
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"threads {args.threads}; features {d} x {g} x {g}; |C_dist| {k}; {args.images} images ({positions} positions)")
    print(f"default  MLP: {n_ours / 1e6:6.2f} M params, {per_pos_ours * 1e6:8.1f} us per trained position, "
          f"epoch {epoch_ours:7.1f} s, {cfg.epochs} epochs {epoch_ours * cfg.epochs / 60:6.1f} min")
    print(f"paper 10x2048: {n_theirs / 1e6:6.2f} M params, {per_pos_theirs * 1e6:8.1f} us per trained position, "
          f"epoch {epoch_theirs:7.1f} s ({epoch_theirs / 60:.1f} min) over all positions")
    print(f"ratio per trained position: {per_pos_theirs / per_pos_ours:.1f}x; per epoch: {epoch_theirs / epoch_ours:.0f}x")


if __name__ == "__main__":
    main()
