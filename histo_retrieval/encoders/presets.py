"""Pathology foundation models whose architecture timm builds, each as its model card describes it.

    preset = PRESETS["uni"]
    path = preset.weights_file(given=None)   # --encoder-weights, else the local folder, else the HF cache

Their weights are gated or licensed by their owners and never downloaded here: a preset reads the file
the user downloaded, from `--encoder-weights`, from `<weights folder>/<preset>/<file>` (the folder is
$HISTO_RETRIEVAL_WEIGHTS, default ~/.cache/histo_retrieval/weights), or from the Hugging Face cache
when it already holds it. docs/encoders.md lists each preset with its licence and its page.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "Preset", "weights_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FOLDER_VARIABLE = "HISTO_RETRIEVAL_WEIGHTS"


def weights_folder() -> Path:
    """Where presets look for the weights a user downloaded: $HISTO_RETRIEVAL_WEIGHTS, or
    ~/.cache/histo_retrieval/weights."""
    return Path(os.environ.get(WEIGHTS_FOLDER_VARIABLE) or Path.home() / ".cache" / "histo_retrieval" / "weights")


@dataclass(frozen=True)
class Preset:
    """A foundation model as its card describes it: timm architecture and keyword arguments, input
    steps, normalisation, scale, pooling, and where its weights and licence are."""

    name: str
    architecture: str
    options: dict[str, Any]
    input_steps: InputSteps
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    pooling: str  # histo_retrieval.encoders.timm_encoders.POOLINGS
    hub_repo: str  # the model's Hugging Face repository
    filename: str  # its weights file there
    licence: str
    source: str = "the model card"  # where the settings above are written
    notes: str = field(default="", compare=False)

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.hub_repo}"

    @property
    def local_path(self) -> Path:
        return weights_folder() / self.name / self.filename

    def weights_file(self, given: str | os.PathLike | None = None) -> str:
        """The weights to read: `given`, else the local folder's file, else the Hugging Face cache's
        (looked up without any network access); UserError naming the page and the path otherwise."""
        if given:
            return os.fspath(given)
        if self.local_path.is_file():
            return os.fspath(self.local_path)
        cached = _hugging_face_cache(self.hub_repo, self.filename)
        if cached:
            return cached
        raise UserError(f"{self.name}: no weights; its owner gates them: accept the terms at {self.page}, download "
                        f"{self.filename} and put it at {self.local_path} (or pass --encoder-weights FILE)")


def _hugging_face_cache(repo: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) and os.path.isfile(found) else None


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("uni", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
           InputSteps(224, 224, "bilinear"), IMAGENET_MEAN, IMAGENET_STD, 0.5, "pooled",
           "MahmoodLab/UNI", "pytorch_model.bin", "CC-BY-NC-ND-4.0 (gated; non-commercial research)",
           notes="ViT-L/16 trained with DINOv2 at 20x; the class token, 1024-d"),
    Preset("uni2-h", "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
           InputSteps(224, 224, "bicubic"), IMAGENET_MEAN, IMAGENET_STD, 0.5, "pooled",
           "MahmoodLab/UNI2-h", "pytorch_model.bin", "CC-BY-NC-ND-4.0 (gated; non-commercial research)",
           notes="ViT-H/14 with 8 register tokens and SwiGLU; the class token, 1536-d"),
    Preset("virchow", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            **_SWIGLU},
           InputSteps(224, 224, "bicubic"), IMAGENET_MEAN, IMAGENET_STD, 0.5, "class+patch-mean",
           "paige-ai/Virchow", "pytorch_model.bin", "Apache-2.0 with the owner's terms (gated)",
           notes="ViT-H/14; the class token beside the mean of the patch tokens, 2560-d"),
    Preset("virchow2", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
            "dynamic_img_size": True, **_SWIGLU},
           InputSteps(224, 224, "bicubic"), IMAGENET_MEAN, IMAGENET_STD, 0.5, "class+patch-mean",
           "paige-ai/Virchow2", "pytorch_model.bin", "CC-BY-NC-ND-4.0 (gated; non-commercial research)",
           notes="ViT-H/14 with 4 register tokens (left out of the mean); class token and patch-token mean, 2560-d"),
    Preset("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
           InputSteps(224), (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 0.5, "pooled",
           "bioptimus/H-optimus-0", "pytorch_model.bin", "Apache-2.0",
           notes="ViT-g/14 with 4 register tokens; its own mean and std; the class token, 1536-d; 224 px at 0.5 um/px"),
    Preset("prov-gigapath", "vit_giant_patch14_dinov2",
           {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5,
            "mlp_ratio": 5.33334},
           InputSteps(224, 256, "bicubic"), IMAGENET_MEAN, IMAGENET_STD, 0.5, "pooled",
           "prov-gigapath/prov-gigapath", "pytorch_model.bin", "Apache-2.0 with the owner's terms (gated)",
           notes="the tile encoder, ViT-g/16; resize 256, centre crop 224; the class token, 1536-d"),
)}
