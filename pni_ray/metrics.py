"""Anomaly-detection metrics following the MVTec AD evaluation conventions.

Every metric is computed exactly from sorted scores (no threshold grid), so the numbers
are reproducible and comparable with published results. Only numpy and scipy are used,
so evaluation runs anywhere, without the model's GPU stack.

Pixel-level inputs can hold tens of millions of pixels; the code therefore works on
sorted copies of the normal and anomalous scores and uses binary search instead of
building full ROC/PR curves, which keeps memory at a few times the input size.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricError",
    "auroc",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "threshold_at_f1_max",
    "compute_all",
]

ImageStack = Union[np.ndarray, Sequence[np.ndarray]]

# MVTec AD defines regions with 8-connectivity (diagonal neighbours belong together).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Binary searches run on blocks of this many queries so index arrays stay small.
_CHUNK = 1 << 20


class UndefinedMetricError(ValueError):
    """The data cannot define the metric (e.g. a single class); compute_all maps it to None."""


# --------------------------------------------------------------------------- inputs


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean labels; other values are refused so multi-class labels are not merged silently."""
    y = np.asarray(labels)
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number) or np.iscomplexobj(y):
        raise ValueError(f"labels must be bool or 0/1 numbers, got dtype {y.dtype}")
    is_one = y == 1
    if not (is_one | (y == 0)).all():
        raise ValueError("labels must be binary: bool or only the values 0 and 1")
    return is_one


def _score_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """Common dtype for scores; keeps float32 as float32 to halve memory on pixel maps."""
    dtype = np.result_type(*dtypes)
    if dtype == bool:
        return np.dtype(np.uint8)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {dtype}")
    return dtype


def _check_no_nan(*arrays: np.ndarray) -> None:
    """NaN has no place in an ordering, so every rank-based metric would be meaningless."""
    for a in arrays:
        if a.dtype.kind == "f" and np.isnan(a).any():
            raise ValueError("scores contain NaN")


def _split_sorted(y: np.ndarray, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Ascending positive and negative scores: the shared basis of AUROC and F1."""
    s = np.asarray(s)
    s = s.astype(_score_dtype([s.dtype]), copy=False)
    _check_no_nan(s)
    pos = s[y]
    neg = s[~y]
    pos.sort()
    neg.sort()
    return pos, neg


def _labels_and_scores(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels)
    s = np.asarray(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same shape, got {y.shape} and {s.shape}")
    return y.ravel(), s.ravel()


def _image_list(x: ImageStack, name: str) -> List[np.ndarray]:
    """Per-image 2-D arrays, so stacks and lists of different resolutions share one code path."""
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise ValueError(
                f"{name} must be an (N, H, W) array or a list of (H, W) arrays, got shape {x.shape}"
            )
        return list(x)
    items = [np.asarray(a) for a in x]
    for i, a in enumerate(items):
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}] must be a 2-D (H, W) array, got shape {a.shape}")
    return items


def _image_pairs(masks: ImageStack, maps: ImageStack) -> List[Tuple[np.ndarray, np.ndarray]]:
    mask_list = _image_list(masks, "masks")
    map_list = _image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    if not mask_list:
        raise ValueError("masks and maps are empty")
    for i, (m, s) in enumerate(zip(mask_list, map_list)):
        if m.shape != s.shape:
            raise ValueError(f"image {i}: mask shape {m.shape} differs from map shape {s.shape}")
    return list(zip(mask_list, map_list))


class _PixelScores:
    """Sorted normal/anomalous pixel scores, plus PRO weights when regions are needed.

    Built once so compute_all can share the expensive sorts between pixel AUROC,
    pixel F1-max and AUPRO.
    """

    def __init__(self, masks: ImageStack, maps: ImageStack, with_regions: bool) -> None:
        pairs = _image_pairs(masks, maps)
        self.num_images = len(pairs)
        dtype = _score_dtype([s.dtype for _, s in pairs])
        binary = [m if m.dtype == bool else m != 0 for m, _ in pairs]  # nonzero = anomalous
        counts = [int(np.count_nonzero(b)) for b in binary]
        n_pos = sum(counts)
        n_neg = sum(b.size for b in binary) - n_pos

        pos = np.empty(n_pos, dtype=dtype)
        neg = np.empty(n_neg, dtype=dtype)
        region = np.empty(n_pos, dtype=np.int64) if with_regions else None
        region_sizes: List[np.ndarray] = []
        num_regions = 0
        p = q = 0
        for b, (_, s), c in zip(binary, pairs, counts):
            pos[p : p + c] = s[b]
            neg[q : q + b.size - c] = s[~b]
            if region is not None and c:
                lab, k = ndimage.label(b, structure=_EIGHT_CONNECTED)
                ids = lab[b]
                region[p : p + c] = ids - 1 + num_regions
                region_sizes.append(np.bincount(ids, minlength=k + 1)[1:])
                num_regions += k
            p += c
            q += b.size - c
        _check_no_nan(pos, neg)

        neg.sort()
        self.neg = neg
        self.num_regions = num_regions
        self.cum_weight: Optional[np.ndarray] = None
        if region is None or n_pos == 0:
            pos.sort()
            self.pos = pos
            return
        # Each anomalous pixel carries 1 / (num_regions * size of its region), so the
        # weight of pixels scoring >= t is exactly PRO(t).
        sizes = np.concatenate(region_sizes).astype(np.float64)
        order = np.argsort(pos, kind="stable")
        self.pos = pos[order]
        del pos
        weight = 1.0 / (num_regions * sizes[region[order]])
        del order, region
        cum = np.empty(n_pos + 1, dtype=np.float64)
        cum[0] = 0.0
        np.cumsum(weight, out=cum[1:])
        cum /= cum[-1]  # makes PRO at the lowest threshold exactly 1 despite rounding
        self.cum_weight = cum


# ------------------------------------------------------------------------- kernels


def _auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney U with midranks: each (pos, neg) pair counts 1 if ordered, 1/2 if tied.

    Counted with binary searches of the smaller class in the larger one, in exact
    integer arithmetic, so the result equals the trapezoidal ROC AUC.
    """
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError(
            "AUROC is undefined when only one class is present "
            f"({n_pos} positive, {n_neg} negative samples)"
        )
    flip = n_pos > n_neg
    query, ref = (neg, pos) if flip else (pos, neg)
    twice_u = 0  # 2 * (#ref strictly below + 1/2 * #ref tied), summed over queries
    for i in range(0, query.size, _CHUNK):
        block = query[i : i + _CHUNK]
        twice_u += int(np.searchsorted(ref, block, side="left").sum(dtype=np.int64))
        twice_u += int(np.searchsorted(ref, block, side="right").sum(dtype=np.int64))
    denominator = 2 * n_pos * n_neg
    if flip:
        twice_u = denominator - twice_u
    return twice_u / denominator


def _f1_sorted(pos: np.ndarray, neg: np.ndarray) -> Tuple[float, float]:
    """Best F1 over thresholds `score >= t`, and the highest t attaining it.

    Only distinct positive scores need checking: moving t up to the next positive score
    keeps every true positive and can only drop false positives.
    """
    n_pos = pos.size
    if n_pos == 0:
        raise UndefinedMetricError("F1 is undefined without positive samples")
    first = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    thresholds = pos[first]
    tp = n_pos - first
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + n_pos)  # = 2PR / (P + R), exact integers until the division
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # equal ratios round equally: ties are exact
    return float(f1[best]), float(thresholds[best])


def _aupro_sorted(data: _PixelScores, fpr_limit: float) -> float:
    """Area under the exact PRO-vs-FPR curve up to fpr_limit, normalised by fpr_limit.

    The trapezoid over tie groups equals, per normal pixel, (1/num_normal) *
    (PRO of anomalous pixels strictly above it + half of those tied with it), like a
    weighted Mann-Whitney statistic. Only the group crossing fpr_limit needs explicit
    linear interpolation along its (possibly diagonal) segment.
    """
    if not (np.isfinite(fpr_limit) and 0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if data.num_regions == 0 or data.cum_weight is None:
        raise UndefinedMetricError("AUPRO is undefined: the masks contain no anomalous region")
    neg, pos, cum = data.neg, data.pos, data.cum_weight
    n_neg = neg.size
    if n_neg == 0:
        raise UndefinedMetricError("AUPRO is undefined: the masks contain no normal pixel")

    def pro_above(t: np.ndarray) -> np.ndarray:
        return 1.0 - cum[np.searchsorted(pos, t, side="right")]

    def pro_at_or_above(t: np.ndarray) -> np.ndarray:
        return 1.0 - cum[np.searchsorted(pos, t, side="left")]

    limit = fpr_limit * n_neg  # the FPR limit in units of normal pixels
    rank = int(np.floor(limit))  # 0-based descending rank of the first pixel past the limit
    if rank < n_neg:
        v = neg[n_neg - 1 - rank]
        start = n_neg - int(np.searchsorted(neg, v, side="right"))  # normal pixels above v
        end = n_neg - int(np.searchsorted(neg, v, side="left"))
    else:
        start = end = n_neg

    area = 0.0  # in units of normal pixels along the FPR axis
    full = neg[n_neg - start :]  # the normal pixels whose tie group ends within the limit
    for i in range(0, full.size, _CHUNK):
        block = full[i : i + _CHUNK]
        area += float(np.sum(0.5 * (pro_above(block) + pro_at_or_above(block))))
    if end > start:
        p_start = float(pro_above(np.asarray(v)))
        p_end = float(pro_at_or_above(np.asarray(v)))
        width = limit - start
        p_limit = p_start + (p_end - p_start) * (width / (end - start))
        area += width * 0.5 * (p_start + p_limit)
    return min(1.0, max(0.0, area / limit))


def _undefined_to_none(fn: Callable[[], float]) -> Optional[float]:
    try:
        return fn()
    except UndefinedMetricError:
        return None


# ---------------------------------------------------------------------- public API


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (ties count 1/2), O(n log n); labels and scores may have any equal shape."""
    y, s = _labels_and_scores(labels, scores)
    return _auroc_sorted(*_split_sorted(y, s))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC; insists on one score per image to catch maps passed by mistake."""
    y, s = np.asarray(labels), np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    return auroc(y, s)


def pixel_auroc(masks: ImageStack, maps: ImageStack) -> float:
    """AUROC over all pixels; masks are anomalous where nonzero (MVTec masks are 0/255)."""
    data = _PixelScores(masks, maps, with_regions=False)
    return _auroc_sorted(data.pos, data.neg)


def aupro(masks: ImageStack, maps: ImageStack, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to fpr_limit (MVTec AD).

    Regions are 8-connected components of each mask, and every region weighs the same
    regardless of size, which is why small defects matter here unlike in pixel AUROC.
    """
    return _aupro_sorted(_PixelScores(masks, maps, with_regions=True), fpr_limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds `score >= t` (exact, ties kept together)."""
    y, s = _labels_and_scores(labels, scores)
    return _f1_sorted(*_split_sorted(y, s))[0]


def threshold_at_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score t such that predicting `score >= t` attains f1_max (highest such t)."""
    y, s = _labels_and_scores(labels, scores)
    return _f1_sorted(*_split_sorted(y, s))[1]


def compute_all(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: Optional[ImageStack],
    maps: Optional[ImageStack],
    fpr_limit: float = 0.3,
) -> Dict[str, Optional[float]]:
    """All standard metrics, sharing the pixel sorts between the pixel-level ones.

    A metric the data cannot define (e.g. no anomalous image, or masks/maps given as
    None) is returned as None instead of raising, so one category without defects does
    not abort a whole benchmark run. Malformed inputs still raise ValueError.
    """
    y, s = np.asarray(image_labels), np.asarray(image_scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"expected 1-D image labels and scores, got shapes {y.shape} and {s.shape}"
        )
    y, s = _labels_and_scores(y, s)
    pos, neg = _split_sorted(y, s)
    result: Dict[str, Optional[float]] = {
        "image_auroc": _undefined_to_none(lambda: _auroc_sorted(pos, neg)),
        "pixel_auroc": None,
        "aupro": None,
        # without good images any threshold below every score gives F1 = 1: defined, and says nothing
        "f1_max": _undefined_to_none(lambda: _f1_sorted(pos, neg)[0]) if neg.size else None,
        "pixel_f1_max": None,
    }
    if masks is None and maps is None:
        return result
    if masks is None or maps is None:
        raise ValueError("masks and maps must both be given or both be None")
    data = _PixelScores(masks, maps, with_regions=True)
    if data.num_images != y.size:
        raise ValueError(f"got {y.size} image labels but {data.num_images} masks/maps")
    result["pixel_auroc"] = _undefined_to_none(lambda: _auroc_sorted(data.pos, data.neg))
    result["aupro"] = _undefined_to_none(lambda: _aupro_sorted(data, fpr_limit))
    result["pixel_f1_max"] = (_undefined_to_none(lambda: _f1_sorted(data.pos, data.neg)[0])
                              if data.neg.size else None)  # no normal pixel: 1.0 that says nothing, as f1_max
    return result
