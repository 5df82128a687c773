"""Deterministic synthetic categories in the MVTec AD layout, for the demo and the tests.

`generate` holds the registry, `render` and `make_synthetic`; each category's drawing is a module
of its own (`textures`: weave and granite, `washer`, `pillbox`) over the shared `drawing` helpers.
"""

from pni_ray.data.synthetic.generate import (
    CATEGORIES,
    DEFECT_TYPES,
    MIN_SIZE,
    SYNTHETIC_SIZE,
    SyntheticSpec,
    image_seed,
    make_synthetic,
    render,
)

__all__ = ["CATEGORIES", "DEFECT_TYPES", "MIN_SIZE", "SYNTHETIC_SIZE", "SyntheticSpec", "image_seed", "make_synthetic",
           "render"]
