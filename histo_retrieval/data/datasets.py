"""Data sets of class folders, the reference's transforms, the seeded split and per-class cut.

    dataset = KimiaDataset("KIMIA_data/train", transform=train_transform(224))
    train, val = split_train_val(len(dataset), val_ratio=0.1, seed=1)
    loader_set = SkipUnreadable(dataset, train)    # unreadable images dropped from batches, reported
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, random_split
from torchvision import transforms

from histo_retrieval.errors import UserError, one_line
from histo_retrieval.files import folder_images, list_classes
from histo_retrieval.images import UNREADABLE, load_rgb
from histo_retrieval.data.preprocessing import NormalizeStep, Preprocessing, StainStep


# ----------------------------------------------------------------------------- transforms
AUGMENTS = ("reference", "stain")


def train_transform(crop_size: int = 224, augment: str = "reference",
                    preprocessing: Preprocessing | None = None) -> transforms.Compose:
    """The reference's training transform (flips, random crop, ToTensor; no normalisation); with
    augment "stain" stain and brightness/contrast variation after the crop (histo_retrieval.data.stain.StainAugment),
    and with `preprocessing` its stain normalisation (before the variation) and its normalisation."""
    if augment not in AUGMENTS:
        raise UserError(f"--augment {augment}: choose one of {', '.join(AUGMENTS)}")
    preprocessing = preprocessing or Preprocessing()
    steps = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(), transforms.RandomCrop(crop_size)]
    if preprocessing.stain:
        steps.append(StainStep(preprocessing))
    if augment == "stain":
        from histo_retrieval.data.stain import StainAugment
        steps.append(StainAugment())
    steps.append(transforms.ToTensor())
    if preprocessing.mean:
        steps.append(NormalizeStep(preprocessing))
    return transforms.Compose(steps)


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class InputSteps:
    """The uint8 half of an encoder's input steps: optionally resize the shorter side to `resize`
    pixels (Pillow's resampling, as torchvision's Resize on an image and timm's eval transform do),
    then cut the centre `crop_size` x `crop_size` square (CenterCrop). Without `resize` this is the
    reference's eval crop. Called on a PIL image or an H x W x 3 uint8 array, it gives 3 x c x c uint8:
    a quarter of the float crop's size, kept between passes (histo_retrieval.evaluation.embedder);
    to [0, 1], the mean and the std follow on the model's device."""

    crop_size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop_size < 1 or (self.resize is not None and self.resize < 1):
            raise UserError(f"input size must be positive (crop {self.crop_size}, resize {self.resize})")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def of(cls, steps: InputSteps | int) -> InputSteps:
        """`steps` itself, or the reference's plain centre crop of that size."""
        return steps if isinstance(steps, InputSteps) else cls(int(steps))

    def to_dict(self) -> dict[str, Any]:
        return {"crop_size": self.crop_size, "resize": self.resize, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: dict) -> InputSteps:
        return cls(int(data["crop_size"]), data.get("resize"), data.get("interpolation", "bilinear"))

    def describe(self) -> str:
        resize = f"resize to {self.resize} px ({self.interpolation}), " if self.resize else ""
        return f"{resize}centre crop {self.crop_size} px"

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray) and self.resize is None:
            return _centre_crop_array(image, self.crop_size)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if self.resize is not None:
            image = transforms.functional.resize(image, self.resize,
                                                 transforms.InterpolationMode(self.interpolation))
        return _uint8_tensor(transforms.functional.center_crop(image, self.crop_size))


def eval_crop(crop_size: int = 224) -> InputSteps:
    """The first half of the validation and test transform: the centre crop as uint8 (3 x c x c)."""
    return InputSteps(crop_size)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """The second half: uint8 images as float32 in [0, 1], ToTensor's own conversion (float, then
    divide by 255), so the values equal ToTensor's bit for bit."""
    return images.float().div(255)


def eval_transform(crop_size: int | InputSteps = 224, preprocessing: Preprocessing | None = None) -> transforms.Compose:
    """The reference's validation and test transform, CenterCrop then ToTensor (no normalisation),
    as eval_crop then to_unit_float (or an encoder's InputSteps then to_unit_float); with
    `preprocessing`, its steps in the order the Embedder applies them (stain on the uint8 crop, then
    the normalisation)."""
    preprocessing = preprocessing or Preprocessing()
    steps = [InputSteps.of(crop_size)]
    if preprocessing.stain:
        steps.append(StainStep(preprocessing))
    steps.append(to_unit_float)
    if preprocessing.mean:
        steps.append(NormalizeStep(preprocessing))
    return transforms.Compose(steps)


def eval_crop_array(pixels: np.ndarray, crop_size: int) -> torch.Tensor:
    """eval_crop of an H x W x 3 uint8 array."""
    return InputSteps(crop_size)(pixels)


def _centre_crop_array(pixels: np.ndarray, crop_size: int) -> torch.Tensor:
    """CenterCrop of an array cut from the array itself: the same values as through PIL (CenterCrop's
    rounding), without the trip."""
    height, width = pixels.shape[:2]
    if height < crop_size or width < crop_size:  # CenterCrop pads first: leave that to it
        return _uint8_tensor(transforms.functional.center_crop(Image.fromarray(pixels), crop_size))
    top, left = int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))
    return torch.from_numpy(pixels[top:top + crop_size, left:left + crop_size]).permute(2, 0, 1).contiguous()


def _uint8_tensor(image: Image.Image) -> torch.Tensor:
    # PILToTensor returns a permuted view; stacking such views would give channels_last batches.
    return transforms.functional.pil_to_tensor(image).contiguous()



# ----------------------------------------------------------------------------- data sets
class KimiaDataset(Dataset):
    """Images of `root/<class>/<image>`, returning (image, label, path).

    Labels index `classes`, which default to the class folders in natural order (the reference
    used file-system order, which differs between machines). Pass the class list saved with a
    checkpoint to evaluate with the labels it was trained with.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        found = list_classes(self.root)
        self.classes = list(classes) if classes is not None else found
        missing = [c for c in found if c not in self.classes]
        if missing:
            raise UserError(f"{self.root}: class folders {missing} are not in the class list {self.classes}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in found:
            self.samples += [(str(path), self.class_to_idx[name]) for path in folder_images(self.root / name)]
        if not self.samples:
            raise UserError(f"{self.root}: no images found in its class folders; run KIMIA_data/data_process.py first")
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, str]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, path


class SkipUnreadable(Dataset):
    """`dataset[indices[i]]`, or a marker for an image that cannot be decoded, which the collate
    function drops from its batch and reports, so one corrupt file does not end a long run."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        try:
            return self.dataset[self.indices[i]]
        except UNREADABLE as err:
            path = self.dataset.samples[self.indices[i]][0]
            return None, None, (path, one_line(err))


def collate_readable(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(images, labels, (path, reason) of the unreadable files) of a batch, without the unreadable ones."""
    good = [s for s in samples if s[0] is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), [s[2] for s in samples]
    return (torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]),
            [s[2] for s in samples if s[0] is None])



# ----------------------------------------------------------------------------- subsets
def split_train_val(num_items: int, val_ratio: float = 0.1, seed: int = 1) -> tuple[list[int], list[int]]:
    """A random (not stratified) split of the reference's sizes: shuffle with `seed`, the first
    int(num_items * (1 - val_ratio)) indices train, the rest validate (as torch.utils.data.random_split).

    Not the reference's images: its NumPy draw runs over os.walk order, which depends on the file
    system, so no split can copy it across machines (docs/reproduction.md, "Data").
    """
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    num_train = int(num_items * (1.0 - val_ratio))
    train, val = random_split(range(num_items), [num_train, num_items - num_train],
                              generator=torch.Generator().manual_seed(seed))
    return list(train), list(val)


def subsample_per_class(targets: Sequence[int], ratio: float, seed: int) -> list[int]:
    """Indices of int(n_c * ratio) images of each class c, drawn with `seed` (train_traindata.py's cut)."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    kept: list[int] = []
    for indices in by_class.values():
        order = torch.randperm(len(indices), generator=generator)[: int(len(indices) * ratio)]
        kept += [indices[i] for i in sorted(order.tolist())]
    return sorted(kept)


# ----------------------------------------------------------------------------- groups (slides, patients)
GROUP_COLUMNS = ("image", "group")


@dataclass(frozen=True)
class Groups:
    """The group (a slide or a patient) of every image of a data folder's splits, from a groups file.

    `by_image` maps an image's path under the data folder, `<split>/<class>/<file>` with '/', to its
    group; `path` and `sha256` name the file it was read from, so results can record it.
    """

    path: str
    sha256: str
    by_image: dict[str, str]
    unmatched_rows: int = 0

    def covers(self, split: str) -> bool:
        """Whether the file gives groups for the images of `split` (read_groups made sure: all or none)."""
        return any(key.startswith(f"{split}/") for key in self.by_image)

    @property
    def names(self) -> list[str]:
        return sorted(set(self.by_image.values()))

    def codes(self, keys: Sequence[str]) -> list[int]:
        """The group of each image (keys as in `by_image`) as an integer, the same integer for the same
        group in every split."""
        index = {name: i for i, name in enumerate(self.names)}
        return [index[self.by_image[key]] for key in keys]

    def record(self) -> dict[str, Any]:
        """What results record of the groups file: its path, sha256 and number of groups."""
        return {"groups": self.path, "groups_sha256": self.sha256, "num_groups": len(self.names)}

    def moved(self, keys: dict[str, str]) -> Groups:
        """The same groups for images that moved (`keys`: old key -> new key, e.g. after
        KIMIA_data/data_process.py renamed them); the file recorded stays this one."""
        return Groups(self.path, self.sha256, {keys[key]: group for key, group in self.by_image.items()},
                      self.unmatched_rows)


def image_key(split: str, class_name: str, file_name: str) -> str:
    """How a groups file and Groups.by_image name an image: `<split>/<class>/<file>`."""
    return f"{split}/{class_name}/{file_name}"


def read_groups(path: str | os.PathLike, data_dir: str | os.PathLike, splits: Sequence[str] = ("test",),
                option: str = "--groups") -> Groups:
    """The groups of the images of `data_dir/<split>/<class>/` for each split, from a CSV with columns
    `image,group` (docs/reproduction.md, "Protocols that respect slides").

    `image` names an image by its path under the data folder (`test/ADI/x.png`), under the split folder
    (`ADI/x.png`), or by its file name alone (`x.png`); a shorter form must name a single image of the
    splits read (else the row is refused, never guessed), and the longest form listed wins. Every image of the first split (the queries) needs a
    group; each other split has a group for every image or for none (then nothing of it is excluded).
    Rows naming no image of the splits are allowed (a file written for more splits than read) and
    counted. UserError (one line) for a missing file or column, an empty cell, an image listed twice,
    an ambiguous file name, or images without a group (the first one named, and how many).
    """
    import csv
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file; pass a CSV with columns image,group")
    content = path.read_bytes()
    try:
        reader = csv.DictReader(content.decode("utf-8-sig").splitlines())
        missing = [c for c in GROUP_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{option} {path}: no column {' or '.join(missing)}; the CSV needs a header "
                            "image,group (image: the file name or its path under the split folder)")
        rows: dict[str, tuple[str, int]] = {}
        for line, row in enumerate(reader, 2):
            image = (row["image"] or "").strip().replace("\\", "/").removeprefix("./")
            group = (row["group"] or "").strip()
            if not image or not group:
                raise UserError(f"{option} {path}: line {line} has an empty {'image' if not image else 'group'}; "
                                "every row needs an image and its group (slide or patient)")
            if image in rows:
                raise UserError(f"{option} {path}: line {line} lists {image} again (first on line "
                                f"{rows[image][1]}); give each image one group")
            rows[image] = group, line
    except UnicodeDecodeError as err:
        raise UserError(f"{option} {path}: not a UTF-8 text CSV ({one_line(err)})") from err
    data_dir = Path(data_dir)
    images = []
    for split in splits:
        dataset = KimiaDataset(data_dir / split)
        images += [(split, dataset.classes[label], Path(file).name) for file, label in dataset.samples]
    # A shorter form naming several images (the same file name in two classes, or the same <class>/<file>
    # in two splits) would guess: refused, the full form asked for.
    form_counts: dict[str, int] = {}
    for _, class_name, name in images:
        for form in (f"{class_name}/{name}", name):
            form_counts[form] = form_counts.get(form, 0) + 1
    by_image: dict[str, str] = {}
    used: set[str] = set()
    for split, class_name, name in images:
        for candidate in (image_key(split, class_name, name), f"{class_name}/{name}", name):
            if candidate in rows:
                if form_counts.get(candidate, 1) > 1:
                    raise UserError(f"{option} {path}: line {rows[candidate][1]}: {candidate} names "
                                    f"{form_counts[candidate]} images of {', '.join(s + '/' for s in splits)}; "
                                    "write its path under the data folder (<split>/<class>/<file>)")
                by_image[image_key(split, class_name, name)] = rows[candidate][0]
                used.add(candidate)
                break
    for number, split in enumerate(splits):
        keys = [image_key(s, c, n) for s, c, n in images if s == split]
        absent = [key for key in keys if key not in by_image]
        if absent and (number == 0 or len(absent) < len(keys)):
            raise UserError(f"{option} {path}: no group for {len(absent)} of the {len(keys)} images of "
                            f"{data_dir / split}, the first {absent[0]}; add a row image,group for each "
                            "(groups are never guessed)")
    return Groups(str(path), hashlib.sha256(content).hexdigest(), by_image, len(rows) - len(used))
