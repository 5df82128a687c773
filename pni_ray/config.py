"""Every tunable of pni-ray, with its default, in one place.

The configs are frozen dataclasses so a trained bundle can record exactly what built it
(`to_dict`) and rebuild it (`from_dict`); the CLI only overrides fields of these.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal

ScoreMode = Literal["patchcore", "neighbourhood", "position", "pni", "pni_split"]
SCORE_MODES: tuple[str, ...] = ("patchcore", "neighbourhood", "position", "pni", "pni_split")
REFINER_SOURCES: tuple[str, ...] = ("all", "holdout")  # RefinerConfig.source: images the synthetic defects are drawn on
MLP_PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")  # NeighbourhoodConfig.train_precision
LR_SCHEDULES: tuple[str, ...] = ("cosine", "step")  # NeighbourhoodConfig.lr_schedule
COMBINE_RULES: tuple[str, ...] = ("both", "mean")  # how mode pni combines p(c|N) and p(c|x), see PatchScorer
TRAIN_MODES: tuple[str, ...] = ("pni", "patchcore")  # TrainConfig.mode
GEOMETRY_POLICIES: tuple[str, ...] = ("resize", "letterbox", "short-side")  # GeometryConfig.policy
POOL_PADDINGS: tuple[str, ...] = ("zeros", "inside")  # FeatureConfig.pool_padding


@dataclass(frozen=True)
class FeatureConfig:
    """Backbone and patch-feature settings.

    320 px input: the stride-8 grid (40 x 40) resolves defects of ~8 px on MVTec-sized images and
    gives the position prior cells small enough to tell a part's place from its neighbour's
    (transistor pni pixel AUROC 0.9862 -> 0.9869, AUPRO 0.9402 -> 0.9524 from 256 px; bottle
    0.9817 -> 0.9844, 0.9301 -> 0.9469), while a 200-image category still trains in minutes
    on 2 CPU cores (1.56x the patches of 256 px).
    """

    backbone: str = "efficientnet_lite2"
    weights: str | None = None  # a user's .safetensors / .pth; None = the registry's source
    pretrained: bool = True  # False: seeded random weights (tests of architectures without weights)
    image_size: int = 320
    patch_size: int = 3  # p x p local average aggregation (PatchCore's p)
    # the p x p average at the grid's border. "zeros": cells outside count as zero, as in PatchCore's reference
    # code and anomalib, so a border patch's feature and its distance to the bank shrink (4/9 at a corner, p = 3);
    # "inside": the mean of the cells inside, full-scale where the backbone's own padding makes features vary
    # most between images, so good images peaked on the border (docs/results.md, "The border of the feature grid")
    pool_padding: str = "zeros"
    projection_dim: int | None = None  # fixed feature dim by adaptive channel pooling

    def __post_init__(self) -> None:  # fails when the config is read, not deep inside the backbone
        _require(self.image_size >= 32, f"features.image_size must be >= 32 pixels (a 2 x 2 grid of stride-16 "
                                        f"features), got {self.image_size!r}")
        _require(self.patch_size >= 1 and self.patch_size % 2 == 1,
                 f"features.patch_size is an odd number of patches >= 1, got {self.patch_size!r}")
        _one_of("features.pool_padding", self.pool_padding, POOL_PADDINGS)


@dataclass(frozen=True)
class CoresetConfig:
    """Greedy k-center memory bank (PatchCore) that also orders entries for C_dist."""

    ratio: float = 0.05  # bottle: 15k of 301k patches; 1% loses 0.3 pt pixel AUROC / 0.96 pt AUPRO on transistor
    max_size: int = 16384  # caps scoring cost on big categories
    min_size: int = 64
    projection_dim: int = 128  # Johnson-Lindenstrauss projection used only for selection
    chunk_size: int = 65536  # rows per distance update: bounds memory at a million patches
    max_candidates: int | None = None  # seeded subsample of patch rows the greedy search runs over (tiling)

    def __post_init__(self) -> None:
        _require(self.ratio > 0.0, f"coreset.ratio is the share of patches kept, > 0 (1: every patch), got {self.ratio!r}")
        _require(1 <= self.min_size <= self.max_size,
                 f"coreset sizes need 1 <= min_size <= max_size, got {self.min_size!r} and {self.max_size!r}")
        _require(self.projection_dim >= 0 and self.chunk_size >= 1
                 and (self.max_candidates is None or self.max_candidates >= 1),
                 f"coreset needs projection_dim >= 0 (0: no projection), chunk_size >= 1 and max_candidates >= 1 "
                 f"(null: every row), got {self.projection_dim!r}, {self.chunk_size!r}, {self.max_candidates!r}")


@dataclass(frozen=True)
class NeighbourhoodConfig:
    """p(c | N_p(x)): an MLP over the window around a patch, centre excluded.

    The paper's 10 x 2048 MLP takes hours on CPU; a bottleneck + masked window conv + 1x1
    layers computes the same function family densely for all positions at once.
    """

    window: int = 9  # paper p = 9
    dist_size: int = 2048  # |C_dist|, a prefix of the greedy order (capped by |C_emb|)
    bottleneck: int | None = 16  # per-neighbour feature width before the window layer (None: the feature dim)
    hidden: int = 128
    depth: int = 2  # hidden 1x1 layers after the window layer
    temperature: float = 2.0  # softmax temperature at inference (paper: 2)
    epochs: int = 12  # at most; training stops earlier when the validation loss stops improving
    patience: int = 2  # epochs without a better validation loss before stopping (best epoch kept)
    # 2 images (3,200 positions at 320 px) per Adam step at lr 2e-3: ~4x the steps of the earlier 8 at 1e-3
    # in the same epochs, which had stopped far from convergence (bottle held-out top-1 0.61 -> 0.76,
    # transistor 0.50 -> 0.68, validation loss 1.94 -> 0.78 and 2.27 -> 1.05), in about the same time
    batch_images: int = 2
    lr: float = 2e-3
    # "step": x lr_gamma every lr_step epochs. "cosine": from lr to 0 along a half cosine over all the
    # planned batches; with epochs 8 and lr 4e-3 it trains the MLP in 0.61-0.64x the time at about the same
    # held-out loss, but costs transistor image AUROC at the same chosen cut (-0.0008 to -0.0017 at three
    # seeds), and at the CI test's 3 epochs the cut rule took 16 tau: pni 0.9767 against the default's
    # 0.9912 there. Measured, not the default (docs/results.md, "The MLP's learning-rate schedule")
    lr_schedule: str = "step"
    lr_step: int = 4  # epochs per step decay ("step")
    lr_gamma: float = 0.3  # ("step")
    val_fraction: float = 0.1
    positions_per_image: int | None = None  # None: every position of every image in each epoch
    # an epoch visits at most this many training images (a fresh seeded draw each epoch), so a
    # 800-image category trains epochs as fast as a 250-image one; None: every image each epoch
    images_per_epoch: int | None = 256
    # "bfloat16": the training steps' convolutions and matmuls under bf16 autocast (weights, loss,
    # optimiser and validation stay fp32), as mixed-precision training does on a GPU: 16-45%
    # less MLP time (1.2-1.8x) where the CPU has native bf16 (AVX512-BF16, AMX), at the same held-out
    # accuracy and test metrics on bottle and transistor; emulated, far slower, on CPUs without it.
    # "auto": bfloat16 where the CPU has native bf16, else float32 (the manifest records which, as
    # training.mlp.precision); "float32": the previous rounds' model.
    train_precision: str = "auto"
    # p(c|N) allows an entry above cut x tau where it masks alone or beside p(c|x) (combine "both",
    # pni_split). None: the strictest of cut_candidates under which held-out good patches keep their
    # nearest entry at a rate >= min_keep (training images only), so a confident MLP masks harder
    # and an unsure one stays at tau; 1.0: tau, the paper's cut
    cut: float | None = None
    cut_candidates: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
    # 0.99 (0.95 before the border rule): at 0.95 a weak MLP (60 transistor images, held-out top-1 0.52) took
    # 8 tau and put pni 0.0075 image AUROC / 0.0054 AUPRO under position; at 0.99 it takes 2 tau and matches it,
    # while bottle and transistor move within their seeds' noise (docs/results.md, "The neighbourhood's keep rate")
    min_keep: float = 0.99

    def __post_init__(self) -> None:  # a config file's bad cut fails when it is read, not after the MLP trained
        _require(self.epochs >= 1 and self.dist_size >= 1 and self.hidden >= 1 and self.depth >= 0,
                 f"neighbourhood needs epochs, dist_size and hidden >= 1 and depth >= 0, got {self.epochs!r}, "
                 f"{self.dist_size!r}, {self.hidden!r}, {self.depth!r}")
        _require(self.lr > 0 and self.temperature > 0,
                 f"neighbourhood.lr and temperature must be > 0, got {self.lr!r} and {self.temperature!r}")
        _require(self.window >= 3 and self.window % 2 == 1,
                 f"neighbourhood.window is the odd side of the window around a patch, >= 3, got {self.window!r}")
        _require(self.lr_step >= 1 and self.lr_gamma > 0 and self.patience >= 0 and 0 <= self.val_fraction < 1,
                 f"neighbourhood needs lr_step >= 1, lr_gamma > 0, patience >= 0 and 0 <= val_fraction < 1, got "
                 f"{self.lr_step!r}, {self.lr_gamma!r}, {self.patience!r}, {self.val_fraction!r}")
        if self.batch_images < 1 or (self.images_per_epoch is not None and self.images_per_epoch < 1):
            raise ValueError(f"neighbourhood.batch_images and images_per_epoch must be >= 1 (images_per_epoch may be "
                             f"null: all), got {self.batch_images!r}, {self.images_per_epoch!r}")
        _one_of("neighbourhood.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("neighbourhood.train_precision", self.train_precision, MLP_PRECISIONS)
        _require(isinstance(self.cut_candidates, (tuple, list))
                 and all(_is_number(c) for c in self.cut_candidates),
                 f"neighbourhood.cut_candidates must be a list of numbers, got {self.cut_candidates!r}")
        if self.cut is not None and not self.cut >= 1.0:
            raise ValueError(f"neighbourhood.cut is a multiple of tau, >= 1 (or null: chosen), got {self.cut!r}")
        if not self.cut_candidates or min(self.cut_candidates) < 1.0:
            raise ValueError(f"neighbourhood.cut_candidates must be multiples of tau >= 1, got {self.cut_candidates!r}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"neighbourhood.min_keep is a share of held-out patches in (0, 1], got {self.min_keep!r}")


@dataclass(frozen=True)
class PositionConfig:
    """p(c | x): per-position histogram of nearest C_emb entries."""

    # each hit counts within +-spread grid positions (a square), a half step adding the four cells one
    # further along the axes (0.5: the 5-cell cross); None: chosen from held-out images
    spread: float | None = None
    spread_candidates: tuple[float, ...] = (0, 0.5, 1, 1.5, 2, 4, 8)  # tried sharpest first when spread is None
    min_keep: float = 0.9  # chosen spread: the sharpest whose mask still allows the nearest C_emb
    # entry of this share of held-out good patches (normal data pays at most 1 - min_keep)
    # within the spread's window an entry is allowed only where it was the nearest at least min_count
    # times; None: the largest of min_count_candidates under which held-out keep stays >= min_keep
    min_count: int | None = None
    min_count_candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    # synthetic defects of each kind (a part moved unchanged, a CutPaste) drawn per held-out image; where position
    # mode scores them below PatchCore mode on both pixel AUROC and AUPRO the scoring mode leaves p(c|x) out
    # (pni -> neighbourhood, position -> patchcore; pni_ray.position_check). 0: no check
    check_defects: int = 1

    def __post_init__(self) -> None:  # a bad spread or count fails when the config is read, not after the features
        _require(isinstance(self.min_count_candidates, (tuple, list)),
                 f"position.min_count_candidates must be a list, got {self.min_count_candidates!r}")
        _require(isinstance(self.spread_candidates, (tuple, list)) and bool(self.spread_candidates),
                 f"position.spread_candidates must list at least one spread, got {self.spread_candidates!r}")
        for spread in ((self.spread,) if self.spread is not None else ()) + tuple(self.spread_candidates):
            _require(_is_number(spread), f"position spreads are numbers, got {spread!r}")
            spread_value(spread)
        _require(isinstance(self.check_defects, int) and not isinstance(self.check_defects, bool)
                 and self.check_defects >= 0,
                 f"position.check_defects is a whole number >= 0 (0: no check), got {self.check_defects!r}")
        counts = ((self.min_count,) if self.min_count is not None else ()) + tuple(self.min_count_candidates)
        _require(bool(self.min_count_candidates) and all(_is_count(c) for c in counts),
                 f"position.min_count and min_count_candidates are whole numbers >= 1, got {self.min_count!r} and "
                 f"{self.min_count_candidates!r}")


@dataclass(frozen=True)
class ScoringConfig:
    """How patch scores become maps, image scores and decisions."""

    mode: str = "pni"
    blur_sigma: float = 4.0  # Gaussian blur of the upsampled map, in pixels (PatchCore: 4)
    tau_scale: float = 0.5  # tau = tau_scale / |C_emb| (paper: 1 / (2 |C_emb|))
    combine: str = "both"  # mode pni: "both" priors must allow an entry, or the paper's "mean" > tau
    image_window: int = 3  # image score = max of the map averaged over image_window^2 patches (0: plain max)
    chunk_patches: int = 4096  # patches per distance block: bounds memory
    # modes position / pni ("both") search only the entries each position allows when the longest
    # such list is at most this share of C_emb (same scores, ~|C_emb| / list length less work)
    candidate_share: float = 0.25
    holdout_fraction: float = 0.1  # train/good images kept out of the memory bank
    min_holdout: int = 2
    threshold_sigmas: float = 3.0  # threshold = mean + k std of held-out image scores

    def __post_init__(self) -> None:  # a config file's bad rule fails when it is read, not after the MLP trained
        _one_of("scoring.mode", self.mode, SCORE_MODES)
        _one_of("scoring.combine", self.combine, COMBINE_RULES)
        # comparisons a NaN passes: TrainConfig names a non-finite setting as such
        _require(not (self.tau_scale <= 0 or self.blur_sigma < 0) and self.image_window >= 0 and self.chunk_patches >= 1,
                 f"scoring needs tau_scale > 0, blur_sigma >= 0, image_window >= 0 and chunk_patches >= 1, got "
                 f"{self.tau_scale!r}, {self.blur_sigma!r}, {self.image_window!r}, {self.chunk_patches!r}")
        _require(not self.candidate_share < 0.0,  # 0: always the dense search; >= 1: always the candidate lists
                 f"scoring.candidate_share is a share of C_emb, >= 0, got {self.candidate_share!r}")
        _require(not (self.holdout_fraction < 0.0 or self.holdout_fraction >= 1.0) and self.min_holdout >= 0,
                 f"scoring.holdout_fraction is a share of train/good in [0, 1) and min_holdout >= 0, got "
                 f"{self.holdout_fraction!r} and {self.min_holdout!r}")


# What bundles written before these ScoringConfig fields existed scored with: the paper's mean of
# the priors and the map's plain maximum (their thresholds were calibrated on those scores).
LEGACY_SCORING: dict[str, Any] = {"combine": "mean", "image_window": 0}
# How bundles written before these NeighbourhoodConfig fields existed trained their MLP (every
# training image each epoch, in float32, on step decay) and cut p(c|N) (at tau).
LEGACY_NEIGHBOURHOOD: dict[str, Any] = {"images_per_epoch": None, "train_precision": "float32", "cut": 1.0,
                                         "lr_schedule": "step"}
# How bundles written before PositionConfig.min_count existed built p(c|x): every entry seen once; before
# check_defects, p(c|x) stayed in the scoring mode unchecked.
LEGACY_POSITION: dict[str, Any] = {"min_count": 1, "check_defects": 0}
# Where bundles written before RefinerConfig.source existed drew the refiner's synthetic defects.
LEGACY_REFINER: dict[str, Any] = {"source": "holdout"}
# How bundles written before FeatureConfig.pool_padding existed averaged border patches (their banks hold those).
LEGACY_FEATURES: dict[str, Any] = {"pool_padding": "inside"}
# every config section's legacy values, the one list TrainConfig.from_manifest fills a bundle's config from
LEGACY_SECTIONS: dict[str, dict[str, Any]] = {"features": LEGACY_FEATURES, "scoring": LEGACY_SCORING,
                                              "neighbourhood": LEGACY_NEIGHBOURHOOD, "position": LEGACY_POSITION,
                                              "refiner": LEGACY_REFINER}


# the synthetic defect families the refiner draws (pni_ray.data.defects.DEFECT_FAMILIES, in that order);
# named here so the CLI and configs know them without importing the drawing code
DEFECT_KINDS: tuple[str, ...] = ("cutpaste", "cutpaste_scar", "perlin", "strokes")


@dataclass(frozen=True)
class RefinerConfig:
    """Refinement network trained on synthetic defects (paper, Sec. 3.4).

    Units: the refiner works on maps in units u = (map - pixel_mean) / (target_sigmas * pixel_std),
    pixel_mean / pixel_std being the PNI model's held-out calibration. In these units a synthetic
    defect pixel's target is 1 and a normal pixel's 0 (the authors' [0, 1] map/mask scale), i.e. a
    defect is asked to stand `target_sigmas` held-out standard deviations above the normal mean.
    By default (None) that level is measured, not guessed: the median normalised PNI score
    (map - pixel_mean) / pixel_std over the synthetic defect pixels of the training set, so the
    refiner reshapes maps around the level PNI already gives defects instead of rescaling them.
    The refined map is u + r (residual r); the map the detector returns is
    (1 - blend) * input + blend * refined = input + blend * r, back on the raw scale.
    """

    enabled: bool = False
    encoder: str = "efficientnet_lite0"  # offline ImageNet weights; "densenet161" (paper) needs timm's hub
    pretrained: bool = True  # False: seeded random encoder (tests, or weights unavailable)
    image_size: int = 128  # resolution the network runs at; maps of any size are resized in and out
    decoder_channels: tuple[int, ...] = (96, 64, 48, 32, 16)  # stride 16, 8, 4, 2, 1
    n_samples: int = 480  # synthetic defect images made from train/good
    # "all": every train/good image but the refiner's calibration split (docs/results.md: bottle, 3 seeds);
    # "holdout": only PNI's held-out images, whose maps are the unseen-image ones but which are few
    source: str = "all"
    # share of PNI's held-out images kept away from the synthetic defects: the refined model's
    # normalisation and threshold are computed on their refined maps (a third split)
    calibration_fraction: float = 0.5
    p_normal: float = 0.1  # share of defect-free samples (target all zero)
    val_fraction: float = 0.1  # synthetic samples kept out of training to report a validation loss
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3  # decoder and head
    encoder_lr_scale: float = 0.1  # the pretrained encoder learns at lr * encoder_lr_scale
    target_sigmas: float | None = None  # None: the median z of synthetic-defect pixels (>= 1), see above
    blend: float = 0.5  # final map = (1 - blend) * input map + blend * refined
    defect_weights: dict[str, float] = field(default_factory=lambda: {kind: 1.0 for kind in DEFECT_KINDS})

    def __post_init__(self) -> None:  # a config file's typo fails when it is read, not after PNI has trained
        _one_of("refiner.source", self.source, REFINER_SOURCES)
        _require(isinstance(self.defect_weights, dict) and bool(self.defect_weights)
                 and set(self.defect_weights) <= set(DEFECT_KINDS)
                 and all(_is_number(w) and not w < 0 for w in self.defect_weights.values())
                 and not sum(self.defect_weights.values()) <= 0,
                 f"refiner.defect_weights maps defect kinds ({', '.join(DEFECT_KINDS)}) to weights >= 0, not all 0, "
                 f"got {self.defect_weights!r}")
        _require(isinstance(self.decoder_channels, (tuple, list)) and bool(self.decoder_channels)
                 and all(_is_count(c) for c in self.decoder_channels),
                 f"refiner.decoder_channels is a list of 5 whole numbers >= 1 (widths at strides 16, 8, 4, 2, 1), "
                 f"got {self.decoder_channels!r}")
        _require(self.n_samples >= 2 and self.epochs >= 1 and self.batch_size >= 1 and self.image_size >= 32,
                 f"refiner needs n_samples >= 2, epochs >= 1, batch_size >= 1 and image_size >= 32, got "
                 f"{self.n_samples!r}, {self.epochs!r}, {self.batch_size!r}, {self.image_size!r}")
        for name in ("calibration_fraction", "p_normal", "val_fraction"):
            value = getattr(self, name)
            _require(not (value < 0.0 or value > 1.0), f"refiner.{name} is a share in [0, 1], got {value!r}")
        _require(not self.blend < 0.0, f"refiner.blend is >= 0 (1: the refined map alone), got {self.blend!r}")


@dataclass(frozen=True)
class GeometryConfig:
    """How images of any shape become model inputs and maps return at their size (pni_ray.geometry).

    policy: "resize" squashes to image_size x image_size (today's behaviour); "letterbox" keeps the
    aspect ratio and pads to the square (padding excluded from coreset, prior, MLP loss and
    metrics); "short-side" scales the short side to image_size, the long side to a multiple of 16.
    tile: cover the image (scaled by tile_scale) with overlapping tile_size tiles (0 = image_size)
    whose features are stitched into one whole-image grid; the policy is then not used.
    """

    policy: str = "resize"  # resize | letterbox | short-side
    tile: bool = False
    tile_size: int = 0  # pixels; 0 = features.image_size
    # pixels between neighbouring tiles, a multiple of 8. Each tile's edge cells are averaged as the grid's border
    # (features.pool_padding "zeros" shrinks them); the overlap's linear weights give them 1/16 of a stitched cell
    # at 64 px, while 0 would leave seams of shrunk features inside the image
    tile_overlap: int = 64
    tile_scale: float = 1.0  # the image is scaled by this before tiling (1.0 = native resolution)
    pad_value: int = 0  # grey level of letterbox / tiling padding
    max_pixels: int = 50_000_000  # larger images are refused (= pni_ray.data.images.DEFAULT_MAX_PIXELS)
    # 16- and 32-bit integer grey images: the value read as white. None: 65535, the 16-bit scale. A camera's 12-bit
    # data written unshifted into 16-bit files: 4095 (10-bit: 1023), else it reads almost black, with 1/16 of its
    # grey levels. Brighter pixels are refused, naming the file. 8-bit and float (0..1) images are read as before
    white_level: int | None = None

    def __post_init__(self) -> None:
        _one_of("geometry.policy", self.policy, GEOMETRY_POLICIES)
        _require(self.white_level is None or (type(self.white_level) is int and 1 <= self.white_level <= 65535),
                 f"geometry.white_level is the 16-bit grey value read as white, an integer in 1..65535 (4095 for "
                 f"12-bit data) or null for 65535, got {self.white_level!r}")
        _require(self.max_pixels >= 1 and 0 <= self.pad_value <= 255,
                 f"geometry needs max_pixels >= 1 and a pad_value grey level in 0..255, got {self.max_pixels!r} and "
                 f"{self.pad_value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained bundle; same config + data + seed + thread count = same bundle
    on the same CPU type (with train_precision "auto" the MLP's precision follows the CPU)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    neighbourhood: NeighbourhoodConfig = field(default_factory=NeighbourhoodConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    mode: str = "pni"  # "pni" trains MLP + position prior; "patchcore" only the memory bank
    seed: int = 0
    batch_size: int = 16  # images per backbone forward

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, TRAIN_MODES)
        # a bundle's manifest is strict JSON (no Infinity or NaN): a non-finite setting could not be written
        # and read back as itself (an infinite neighbourhood.cut would read back as null, "chosen")
        for path, value in _floats(self):
            _require(math.isfinite(value), f"{path} must be a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config to train with (a --config file): `check_trainable` as well as each section's checks."""
        cfg = _build(cls, data)
        cfg.check_trainable()
        return cfg

    def check_trainable(self) -> None:
        """Values that failed only after the PNI model had trained, or were read as another value (0 as null),
        refused before training. Not applied to a bundle's recorded config (`from_manifest`): bundles trained
        with such values before this check still load and score as they did."""
        # numpy's seed range: the refiner's generators refuse negative seeds, torch's overflow near 2**63
        _require(not isinstance(self.seed, bool) and isinstance(self.seed, int) and 0 <= self.seed < 2**32,
                 f"seed is a whole number in 0..{2**32 - 1}, got {self.seed!r}")
        _require(self.batch_size >= 1, f"batch_size is the images per backbone forward, >= 1, got {self.batch_size!r}")
        side, most = self.features.image_size, self.geometry.max_pixels  # a typo's 100000 px ran into the OOM killer
        _require(side * side <= most, f"features.image_size {side} is a {side} x {side} model input of {side * side:,} "
                                      f"pixels, over geometry.max_pixels ({most:,}), the limit decoded images are held "
                                      "to (a --config file's geometry.max_pixels raises it, where memory allows)")
        _require(self.features.projection_dim is None or self.features.projection_dim >= 1,
                 f"features.projection_dim is a feature width >= 1 (null: the backbone's), got "
                 f"{self.features.projection_dim!r}")
        _require(self.coreset.ratio <= 1.0,
                 f"coreset.ratio is the share of patches kept, in (0, 1] (1: every patch), got {self.coreset.ratio!r}")
        n = self.neighbourhood
        _require(all(v is None or v >= 1 for v in (n.bottleneck, n.positions_per_image)),
                 f"neighbourhood.bottleneck and positions_per_image are >= 1 (null: the feature width, every position), "
                 f"got {n.bottleneck!r} and {n.positions_per_image!r}")
        _require(0.0 < self.position.min_keep <= 1.0,
                 f"position.min_keep is a share of held-out patches in (0, 1], got {self.position.min_keep!r}")
        _require(not self.scoring.threshold_sigmas < 0.0,  # below the held-out mean: most good parts flagged
                 f"scoring.threshold_sigmas is k >= 0 in threshold = mean + k std of held-out image scores, got "
                 f"{self.scoring.threshold_sigmas!r}")
        c = self.coreset
        _require(c.max_candidates is None or c.max_candidates >= c.min_size,  # else a bank below its floor
                 f"coreset.max_candidates is at least coreset.min_size ({c.min_size!r}): the bank is drawn from them "
                 f"(null: every row), got {c.max_candidates!r}")
        r = self.refiner
        _require(len(r.decoder_channels) == 5,
                 f"refiner.decoder_channels is a list of 5 whole numbers >= 1 (widths at strides 16, 8, 4, 2, 1), "
                 f"got {r.decoder_channels!r}")
        _require(r.lr > 0 and not r.encoder_lr_scale < 0 and (r.target_sigmas is None or r.target_sigmas > 0),
                 f"refiner needs lr > 0, encoder_lr_scale >= 0 and target_sigmas > 0 (null: measured), got {r.lr!r}, "
                 f"{r.encoder_lr_scale!r} and {r.target_sigmas!r}")

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "TrainConfig":
        """A bundle's recorded config. Bundles written before a field existed keep what they were trained
        or calibrated with (LEGACY_SECTIONS), not today's default."""
        return _build(cls, {**data, **{section: {**legacy, **(data.get(section) or {})}
                                       for section, legacy in LEGACY_SECTIONS.items()}})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _floats(config: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float setting of a config and its sections (tuples included), named by its dotted path."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(config):
        value, path = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(_floats(value, f"{path}."))
        elif isinstance(value, float):
            out.append((path, value))
        elif isinstance(value, (tuple, list)):
            out.extend((path, v) for v in value if isinstance(v, float))
        elif isinstance(value, dict):  # refiner.defect_weights
            out.extend((f"{path}.{k}", v) for k, v in value.items() if isinstance(v, float))
    return out


def spread_value(spread: float) -> int | float:
    """A spread as stored and logged: a whole number as an int (bundles of integer spreads stay as
    they were), a half step as a float; anything else is refused."""
    doubled = float(spread) * 2
    if not (doubled >= 0 and doubled.is_integer()):
        raise ValueError(f"a position spread is a non-negative multiple of 0.5, got {spread!r}")
    return int(spread) if doubled % 2 == 0 else float(spread)


def float_from_json(key: str, value: Any) -> float:
    """A number a strict-JSON record held (pni_ray.fileio.finite_json writes what JSON cannot hold
    as null): null under a key naming a threshold was +inf (a model without one), any other null NaN."""
    if value is None:
        return float("inf") if "threshold" in key else float("nan")
    return float(value)


THREADS_ENV = "PNI_RAY_THREADS"  # torch / ONNX Runtime threads where a command is given no --threads


def threads_from_env() -> int | None:
    """$PNI_RAY_THREADS as a thread count; None when unset or empty (a templated job's blank). Anything else but
    a positive integer is refused naming the variable, not met as int()'s or torch's traceback."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 1:  # "²".isdigit() is true, and int() refuses it
        raise ValueError(f"${THREADS_ENV}={os.environ[THREADS_ENV]!r}: a number of threads, at least 1 (unset it for "
                         "all cores)")
    return int(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    """A whole number >= 1 (JSON's true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# a config file's JSON values against the fields' annotations (strings, under `from __future__ import annotations`)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked(cls: type, key: str, annotation: str, value: Any) -> Any:
    """The value, refused when of the wrong JSON type ("epochs": "3") as the config is read, not minutes
    into training. A whole number written as a float (5e7, as some JSON writers do) reads as an int."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return value
        if part == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if part in _JSON_TYPES:
            if isinstance(value, _JSON_TYPES[part]) and (part == "bool" or not isinstance(value, bool)):
                return value
        elif part.startswith(("tuple", "list")):
            if isinstance(value, (list, tuple)):
                return value
        elif part != "None":  # a type this check does not know: left to the dataclass
            return value
    raise ValueError(f"{cls.__name__}.{key} must be {annotation}, got {value!r}")


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild nested frozen dataclasses, refusing unknown keys so typos fail loudly, and values of the
    wrong type."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = names[key].default_factory() if names[key].default_factory is not dataclasses.MISSING else names[key].default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{cls.__name__}.{key} is a section of settings (a JSON object), got {value!r}")
            kwargs[key] = _build(type(default), value)
        else:
            kwargs[key] = _checked(cls, key, str(names[key].type), value)
    return cls(**kwargs)


def paper_config() -> TrainConfig:
    """The authors' settings (PNI, ICCV 2023, and their released code) for users with a GPU.

    480 px input, patch 5, a 1% coreset, p(c|N) from a 10 x 2048 MLP over the full 9 x 9 window
    (no bottleneck: each neighbour's feature at full width), p(c|x) spread +-4, the paper's mean of the
    two priors against tau, blur sigma 8 and the map's plain maximum as image score. The backbone
    stays the offline default: the paper's wide_resnet101_2 needs timm's hub or --weights. On the
    project's 2-core CPUs the MLP alone costs 8-15 min per epoch on bottle (benchmarks/bench_mlp_cost.py).
    Where it is still this project's model, not the authors': a learned full-width 1 x 1 layer (with
    a ReLU) maps each neighbour's feature before the window layer, one layer more than their MLP; and
    the image score is the blurred map's maximum, where their code takes the unblurred patch grid's.
    The prior is always used, as theirs is: no synthetic-defect check of what p(c|x) buys (position.check_defects 0).
    """
    base = TrainConfig()
    return base.replace(
        features=dataclasses.replace(base.features, image_size=480, patch_size=5),
        coreset=dataclasses.replace(base.coreset, ratio=0.01),
        neighbourhood=dataclasses.replace(base.neighbourhood, bottleneck=None, hidden=2048, depth=9, cut=1.0),
        position=dataclasses.replace(base.position, spread=4, min_count=1, check_defects=0),
        scoring=dataclasses.replace(base.scoring, combine="mean", blur_sigma=8.0, image_window=0),
    )


PRESETS = {"default": TrainConfig, "paper": paper_config}
