"""What a model's input goes through beyond the reference's crop and ToTensor, saved with its checkpoint.

    preprocessing = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)   # a pretrained start
    checkpoint["preprocessing"] = preprocessing.to_dict()
    Preprocessing.from_dict(checkpoint.get("preprocessing"))               # the reference's: nothing

The reference normalises nothing, and neither does the default. A pretrained start adds the mean and
standard deviation its weights expect; `--stain-normalize macenko` adds a stain normalisation of each
crop to one target's stain. Training (histo_retrieval.data.datasets's transforms) and every tool that embeds images
(histo_retrieval.evaluation.embedder.Embedder, hence multi_test, retrieve and the search page) apply the same steps in the
same order: crop, stain normalisation (uint8), to [0, 1], mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from histo_retrieval.errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    stain: dict | None = None  # histo_retrieval.data.stain.MacenkoNormalizer.state()

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise UserError("a normalisation needs both a mean and a standard deviation")

    @property
    def is_reference(self) -> bool:
        return self.mean is None and self.stain is None

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "stain": self.stain}

    @classmethod
    def from_dict(cls, data: dict | None) -> Preprocessing:
        """The checkpoint's record; an older checkpoint without one, or a bare state_dict, is the reference's."""
        if not data:
            return cls()
        try:
            mean, std = data.get("mean"), data.get("std")
            return cls(tuple(map(float, mean)) if mean else None, tuple(map(float, std)) if std else None,
                       data.get("stain") or None)
        except (TypeError, ValueError, AttributeError) as error:
            raise UserError(f"a checkpoint's preprocessing record is malformed ({error})") from None

    def describe(self) -> str:
        parts = []
        if self.stain:
            parts.append(f"Macenko stain normalisation to {self.stain.get('target') or 'a target'}")
        if self.mean:
            parts.append(f"mean {list(self.mean)} / std {list(self.std)}")
        return ", ".join(parts) or "none (the reference's)"

    @cached_property
    def stain_normalizer(self):
        """The stain normaliser (histo_retrieval.data.stain.MacenkoNormalizer), or None."""
        if not self.stain:
            return None
        from histo_retrieval.data.stain import MacenkoNormalizer
        return MacenkoNormalizer.from_state(self.stain)

    def passed_through_note(self) -> str | None:
        """One line on the patches whose stain could not be estimated (they went in unchanged), or None."""
        count = self.stain_normalizer.passed_through if self.stain else 0
        return (f"stain normalisation: {count} patch(es) had no stain to estimate (blank or nearly white) and went "
                "in unchanged") if count else None

    # ------------------------------------------------------------------ the steps
    def normalize_stain(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> the same, stain-normalised (unchanged without a stain step)."""
        return self.stain_normalizer(image) if self.stain else image

    def normalize_stain_batch(self, images: torch.Tensor) -> torch.Tensor:
        """n x 3 x H x W uint8 on the CPU -> the same, each image stain-normalised."""
        if not self.stain:
            return images
        out = [torch.from_numpy(np.ascontiguousarray(self.normalize_stain(image.permute(1, 2, 0).numpy())))
               for image in images]
        return torch.stack(out).permute(0, 3, 1, 2).contiguous() if out else images

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (n x 3 x H x W, or 3 x H x W) -> normalised by the mean and std."""
        if self.mean is None:
            return batch
        shape = (3, 1, 1) if batch.dim() == 3 else (1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device).view(shape)
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device).view(shape)
        return (batch - mean) / std


class StainStep:
    """The stain normalisation as a transform step: a PIL image (training, after the crop) or a
    3 x H x W uint8 tensor (validation and embedding, after the crop)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, Image.Image):
            return Image.fromarray(self.preprocessing.normalize_stain(np.asarray(image.convert("RGB"))))
        return self.preprocessing.normalize_stain_batch(image.unsqueeze(0))[0]


class NormalizeStep:
    """The mean and standard deviation as a transform step on float images in [0, 1]."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.normalize(image)
