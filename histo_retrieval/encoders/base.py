"""The encoder: what turns a patch into one vector, with everything a tool needs to feed it and to
record what made an index or a result.

    encoder = load_encoder("timm:vit_small_patch16_224", weights="vit_s.safetensors")   # the registry
    crops = encoder.input_steps(image)                 # uint8 resize and centre crop (data loader side)
    rows = Embedder(encoder.model, device, preprocessing=encoder.preprocessing).embed(crops)

Every encoder has the same shape whatever it is: a checkpoint of this project, a timm architecture, a
pathology foundation model preset, or the colour histogram. `model` takes float images in [0, 1]
after `preprocessing` (stain, mean, std) and returns n x dim rows (a list of M learners' rows for
the paper's ABE-M and ResNet heads); histo_retrieval.evaluation.metrics.combine_learners makes them
L2-normalised vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.weights import tensors_sha256

__all__ = ["Encoder", "EncoderKind", "ENCODER_KINDS"]

EncoderKind = Literal["checkpoint", "timm", "preset", "histogram"]
ENCODER_KINDS: tuple[str, ...] = ("checkpoint", "timm", "preset", "histogram")


@dataclass
class Encoder:
    """A model in eval mode with its input steps, its size and its identity.

    `spec` is what the user named (a checkpoint path, `timm:<architecture>`, a preset, `histogram`);
    `model_name` the architecture (se_resnet50, vit_large_patch16_224, ...); `model_options` the
    keyword arguments it was built with; `path` the file its weights came from ('' when none).
    The facts of a training run (class names, loss, seed) are those of a checkpoint of this project,
    None for any other encoder.
    """

    model: nn.Module
    spec: str
    kind: EncoderKind
    model_name: str
    model_options: dict
    input_steps: InputSteps
    dim: int
    path: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # applied by every Embedder of it
    mpp: float | None = None  # the scale the encoder expects, when its source states one
    pooling: str = ""  # how a vector is made of the model's output, as documented (docs/encoders.md)
    class_names: list[str] | None = None
    loss_name: str | None = None
    source: str = ""  # "checkpoint" (train.py), "reference state_dict", "timm", "preset", "histogram"
    seed: int | None = None

    @property
    def crop_size(self) -> int:
        return self.input_steps.crop_size

    def weights_sha256(self) -> str:
        """SHA-256 of the model's tensors in key order: the same weights give the same hash whatever
        file or wrapper they were saved in (an index and a results file record it)."""
        return tensors_sha256(self.model.state_dict(), salt=str(sorted(self.model_options.items())) if self.kind == "histogram" else "")

    def describe(self) -> str:
        """One line for logs: the encoder, its vector and its input steps."""
        scale = f", {self.mpp} um/px" if self.mpp else ""
        return (f"{self.spec} ({self.model_name}, {self.dim}-d{', ' + self.pooling if self.pooling else ''}; "
                f"{self.input_steps.describe()}; normalisation {self.preprocessing.describe()}{scale})")
