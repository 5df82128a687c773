"""MVTec AD layout reader: `CAT/train/good`, `CAT/test/<type>`, `CAT/ground_truth/<type>/<stem>_mask.png`.

Validation collects every problem of a category before failing, so one run tells the user
all that must be fixed rather than one file at a time.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pni_ray.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_image,
    image_size,
    is_image_file,
    list_images,
    load_mask,
    load_rgb,
    quarter_turned,
    warn_once,
)
from pni_ray.fileio import special_file

GOOD = "good"


class LayoutError(ValueError):
    """A category folder that does not follow the MVTec AD layout; lists every problem found."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{root}: invalid MVTec AD layout:\n  - {shown}{more}")


@dataclass(frozen=True)
class TestSample:
    path: Path
    defect_type: str
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


@dataclass
class Category:
    root: Path
    name: str
    train: list[Path]
    test: list[TestSample] = field(default_factory=list)
    image_only: bool = False  # read without masks: image-level metrics only (`evaluate --image-only`)

    @property
    def has_test(self) -> bool:
        return bool(self.test) and any(s.label for s in self.test) and any(not s.label for s in self.test)

    def mask(self, sample: TestSample, hw: tuple[int, int]) -> np.ndarray:
        if sample.mask_path is None:
            return np.zeros(hw, dtype=bool)
        mask = load_mask(sample.mask_path, hw)
        if sample.label and not mask.any():
            warn_once("empty mask", sample.mask_path, "%s: the mask of a %s image marks no pixel: the image counts "
                      "as defective for image AUROC but adds no defect pixel to pixel AUROC or AUPRO", sample.defect_type)
        return mask


def mask_path_for(root: Path, defect_type: str, image: Path) -> Path:
    return root / "ground_truth" / defect_type / f"{image.stem}_mask.png"


def masks_by_lower_name(folder: Path) -> dict[str, Path]:
    """Lower-cased file name -> file, for names that one case-insensitive name does not share with another: a
    `_mask.PNG` is its image's mask (images may be `.PNG`) where no `_mask.png` exists."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    counts: dict[str, int] = {}
    for p in files:
        counts[p.name.lower()] = counts.get(p.name.lower(), 0) + 1
    return {p.name.lower(): p for p in files if counts[p.name.lower()] == 1}


def orphan_masks(root: Path, test: list[TestSample], named: set[Path] | None = None) -> list[Path]:
    """Masks under ground_truth/ whose test image is not there: a lost or renamed defect image would
    otherwise just shrink the test set. named: mask paths already named in their image's problem (no file there);
    ground_truth/good/ is no defect type (good images have no masks)."""
    used = {s.mask_path for s in test if s.mask_path is not None} | (named or set())
    gt = root / "ground_truth"
    return sorted(m for d in (sorted(gt.iterdir()) if gt.is_dir() else [])
                  if d.is_dir() and not d.name.startswith(".") and d.name != GOOD
                  for m in d.iterdir() if m.name.lower().endswith("_mask.png") and m not in used)


def _not_a_mask_file(path: Path) -> str | None:
    """What is at a mask's path that is not a file (a folder, a broken link), None where nothing is."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "a folder"
    return special_file(path) if path.exists() else None


def list_categories(data_root: Path | str) -> list[str]:
    """Sub-folders of data_root that look like categories (have a train/ folder)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data root not found: {data_root}")
    return sorted(p.name for p in data_root.iterdir()
                  if p.is_dir() and (p / "train").is_dir() and not p.name.startswith("."))  # .snapshot/, .Trash/


def missing_category_message(data_root: Path | str, category: str) -> str | None:
    """Why DATA_ROOT/CATEGORY is no category folder, in words for the person who typed them; None if it is a folder.

    Says what DATA_ROOT should be, lists the categories found under it, and, when DATA_ROOT itself
    looks like a category folder (it has train/), says to pass its parent.
    """
    import difflib

    data_root = Path(data_root)
    root = data_root / category
    if category in ("", ".", "..") or "/" in category or os.sep in category:  # else a bundle would land in the data
        what = f"no category {category!r}: a category is one folder name directly under DATA_ROOT, without '/' or '..'"
        if category in ("", ".", ".."):
            return what
        typed = Path(os.path.abspath(root))
        return f"{what}; for the folder {typed}, give its parent as DATA_ROOT and -c {typed.name}"
    if root.is_dir():
        return None
    lines = [f"no category folder {root}."]
    lines.append("DATA_ROOT is the folder that holds the category folders (like bottle/), each with train/good/ "
                 "of good images (and test/<type>/ with ground_truth/<type>/ masks for evaluate).")
    is_category = (data_root / "train").is_dir()
    if is_category:
        typed = Path(os.path.abspath(data_root))  # as the user named it, links kept (resolve would show their targets)
        lines.append(f"{data_root} itself looks like a category folder (it has train/): pass its parent as "
                     f"DATA_ROOT: {typed.parent} -c {typed.name}")
    try:
        found = list_categories(data_root)
    except OSError:
        found = []
    if found:
        lines.append(f"Categories found under {data_root}: {', '.join(found)}.")
        same = [name for name in found if unicodedata.normalize("NFC", name) == unicodedata.normalize("NFC", category)]
        close = [] if same else difflib.get_close_matches(category, found, n=1)
        if same:  # "Did you mean -c café" for the café typed would read as the same name
            what = (f"The folder {same[0]} is the name typed, written in another Unicode form ({ascii(same[0])} against "
                    f"{ascii(category)})")
            if unicodedata.is_normalized("NFC", same[0]):  # the name given was decomposed (pasted from macOS text)
                lines.append(f"{what}: type the name, rather than paste it (the text pasted holds its accents as "
                             "separate marks).")
            else:  # the folder's name was decomposed (copied from macOS)
                lines.append(f"{what}: its accents are separate marks, as macOS and some copies write them. Rename "
                             f"the folder to the form a keyboard types, e.g. `convmv -f utf8 -t utf8 --nfc --notest "
                             f"'{data_root / same[0]}'` (Debian package convmv).")
        elif close:
            lines.append(f"Did you mean -c {close[0]}?")
    elif not is_category:  # (a category folder holds none: said above)
        lines.append(f"No category folders (sub-folders with train/) found under {data_root}.")
    return "\n".join(lines)


def _other_case(folder: Path) -> str:
    """' (found <path>: rename it <name>)' where the folder exists under another case, else ''."""
    if not folder.parent.is_dir():
        return ""
    found = [p.name for p in folder.parent.iterdir() if p.is_dir() and p.name.lower() == folder.name.lower()]
    return f" (found {folder.parent / found[0]}: rename it {folder.name})" if found else ""


def load_category(
    data_root: Path | str, category: str, check_files: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
    with_test: bool = True, with_masks: bool = True, white_level: int | None = None, with_train: bool = True,
) -> Category:
    """Read and validate one category; raise LayoutError naming every problem found.

    check_files decodes each image (and reads each mask's size) so unreadable files fail here,
    before minutes of training, and not in the middle of it; images over `max_pixels` are refused, and so are
    16-bit grey images brighter than the model's `white_level` (geometry.white_level).
    with_test=False reads train/good alone (training): a test split's problem is the evaluation's to
    report, never a reason not to train. with_masks=False reads defect images without their masks, for
    image-level metrics where a line has labels but no masks (`Category.image_only`). with_train=False reads the
    test split alone (evaluation): train/good's problems, or its absence, are training's to report.
    """
    root = Path(data_root) / category
    problems: list[str] = []
    if not root.is_dir():
        raise LayoutError(root, [f"category folder {root} does not exist"])
    train_dir = root / "train" / GOOD
    train = list_images(train_dir) if with_train and train_dir.is_dir() else []
    if with_train and not train_dir.is_dir():
        problems.append(f"{train_dir} is missing: good training images go in train/good/"
                        + _other_case(train_dir))
    elif with_train and not train:
        problems.append(f"{train_dir} has no train images (png, jpg, bmp, tif)")
    test: list[TestSample] = []
    test_dir = root / "test"
    named: set[Path] = set()  # mask paths a problem names
    if with_test and test_dir.is_dir():
        loose = sorted(p.name for p in test_dir.iterdir() if p.is_file() and is_image_file(p))
        if loose:  # a test image is labelled by its folder: one directly in test/ has no label
            warn_once("loose test images", test_dir, "%s: %d image(s) directly in test/, not evaluated (e.g. %s): a "
                      "test image goes in test/good/ or test/<defect type>/, which says what it is", len(loose),
                      ", ".join(loose[:3]))
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if type_dir.name != GOOD and type_dir.name.lower() == GOOD:  # else its good images count as defects
                problems.append(f"{type_dir}: good test images go in test/{GOOD}/ (lower case, as the labels read it); "
                                "rename the folder")
                continue
            by_lower_name: dict[str, Path] | None = None
            for image in list_images(type_dir):
                mask = None
                if type_dir.name != GOOD and with_masks:
                    mask = mask_path_for(root, type_dir.name, image)
                    if not mask.is_file():  # another case? the folder listed once, only when needed
                        by_lower_name = by_lower_name if by_lower_name is not None else masks_by_lower_name(mask.parent)
                        mask = by_lower_name.get(mask.name.lower(), mask)
                    if not mask.is_file():
                        there = _not_a_mask_file(mask)
                        named.add(mask)
                        problems.append(f"{image}: defect image without a mask (expected {mask}"
                                        + (f", which is {there}" if there else "")
                                        + "; without masks, `evaluate --image-only` gives the image-level metrics)")
                        continue
                test.append(TestSample(image, type_dir.name, mask))
        for mask in orphan_masks(root, test, named) if with_masks else []:
            warn_once("orphan mask", mask, "%s: mask without a test image (expected %s.<png, jpg, ...>): that image "
                      "is not evaluated", root / "test" / mask.parent.name / mask.stem[: -len("_mask")])
    if check_files:
        for path in train:
            try:
                check_image(path, max_pixels, white_level)
            except ImageError as exc:
                problems.append(str(exc))
        for sample in test:
            try:
                w, h = check_image(sample.path, max_pixels, white_level)
                if sample.mask_path is not None:
                    mw, mh = image_size(sample.mask_path, max_pixels)
                    if (mw, mh) != (w, h):
                        turned = (mw, mh) == (h, w) and quarter_turned(sample.path)  # drawn on the stored pixels
                        problems.append(
                            f"{sample.mask_path}: mask of another size ({mw}x{mh}) than its image {sample.path} ({w}x{h})"
                            + ("; sizes are upright, after EXIF orientation: the mask is the image's turned a quarter, "
                               "so draw it on the image as displayed, or save the image without its EXIF orientation"
                               if turned else "")
                        )
            except ImageError as exc:
                problems.append(str(exc))
    if problems:
        raise LayoutError(root, problems)
    return Category(root=root, name=category, train=train, test=test, image_only=not with_masks)


def derive_category(
    src_root: Path | str,
    category: str,
    dst_root: Path | str,
    crop: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write a copy of an MVTec-layout category with every image and mask cropped and/or resized alike.

    crop (top, left, height, width) is applied first, then size (height, width): images bilinear,
    masks nearest. For geometry experiments (non-square crops, upscaled sets); writes PNGs.
    """
    from PIL import Image

    src, dst = Path(src_root) / category, Path(dst_root) / category
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")]
    for path in files:
        rel = path.relative_to(src)
        is_mask = rel.parts[0] == "ground_truth"  # read as evaluate reads them: upright, alpha over black
        img = Image.fromarray(load_mask(path).astype(np.uint8) * 255 if is_mask else load_rgb(path))
        if crop is not None:
            top, left, h, w = crop
            img = img.crop((left, top, left + w, top + h))
        if size is not None:
            img = img.resize((size[1], size[0]), Image.NEAREST if is_mask else Image.BILINEAR)
        out = (dst / rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
    return dst
