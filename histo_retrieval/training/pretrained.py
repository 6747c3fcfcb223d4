"""Pretrained starts: a torchvision-layout ResNet-50 or GoogLeNet state_dict into this project's models.

    report = load_pretrained(model, "se_resnet50", "imagenet")     # torchvision's ImageNet weights
    report = load_pretrained(model, "resnet50", "retccl.pth")      # any file in torchvision's layout
    print(report.summary())

resnet50 and se_resnet50 take a ResNet-50's stem and four stages (their SE blocks, the attention
trunk and heads and the embedding layer stay newly initialised); ABE_M takes GoogLeNet's stem and
inception blocks 3a-5b, where their shapes agree (torchvision's GoogLeNet has a 3x3 convolution where
the 5x5 branch is, and an extra 1x1 convolution in its stem; those stay new too, as do ABE_M's
attention trunk, its heads and the embedding layer). Checkpoint wrappers ({"state_dict": ...},
{"model": ...}) and key prefixes ("module.", "backbone.", "encoder.", "model.") are taken off first.

With pretrained weights the inputs are normalised as the weights expect (`PRETRAINED_NORMALIZATION`);
the checkpoint records it and every tool that embeds with it applies it (histo_retrieval.data.preprocessing).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from histo_retrieval.encoders.weights import read_torch_file
from histo_retrieval.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# What each family's torchvision weights expect: ResNet-50 ImageNet normalisation; GoogLeNet's
# weights were trained on inputs in [-1, 1] (torchvision's transform_input maps ImageNet-normalised
# inputs back to that), which is mean 0.5 and std 0.5 on [0, 1] inputs.
PRETRAINED_NORMALIZATION = {"resnet": (IMAGENET_MEAN, IMAGENET_STD), "googlenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
FAMILY = {"resnet50": "resnet", "se_resnet50": "resnet", "ABE_M": "googlenet"}
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
PREFIXES = ("module.", "backbone.", "encoder.", "model.", "resnet.", "net.")


@dataclass
class PretrainedReport:
    """What a pretrained file gave the model."""
    source: str
    family: str
    loaded: list[str] = field(default_factory=list)  # the model's keys set from the file
    new: list[str] = field(default_factory=list)  # the model's keys left as initialised
    unused: list[str] = field(default_factory=list)  # the file's keys not used
    mismatched: list[str] = field(default_factory=list)  # "file key (shape) -> model key (shape)"
    file_keys: list[str] = field(default_factory=list)
    zeroed: list[str] = field(default_factory=list)  # biases of loaded convolutions the file has none for

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return PRETRAINED_NORMALIZATION[self.family]

    def summary(self) -> str:
        unused = set(self.unused)
        used = [key for key in self.file_keys if key not in unused]
        lines = [f"pretrained {self.source}: loaded {len(self.loaded)} tensors"
                 + (f", and zeroed the biases of {len(self.zeroed)} of its convolutions (the file's have none)"
                    if self.zeroed else ""),
                 f"  stayed new: {len(self.new)} ({_modules(self.new, self.loaded)})",
                 f"  not used from the file: {len(self.unused)} ({_modules(self.unused, used)})"]
        if self.mismatched:
            lines.append(f"  shapes differ for {len(self.mismatched)} (left new), first: {self.mismatched[0]}")
        return "\n".join(lines)

    def record(self) -> dict:
        """What the checkpoint keeps: the source and the counts (the key lists are long)."""
        return {"source": self.source, "family": self.family, "loaded": len(self.loaded), "zeroed": len(self.zeroed),
                "new": len(self.new),
                "unused": len(self.unused), "mismatched": len(self.mismatched)}


def _modules(keys: list[str], others: list[str], most: int = 8) -> str:
    """Many keys in a few words: a top-level module all of whose keys are among them by its name
    ('att_layer'), one only partly among them by the first sub-module that tells them apart
    ('layers1.*.se_module')."""
    if not keys:
        return "none"
    partly = {key.split(".")[0] for key in others}
    names = []
    for key in keys:
        parts = key.split(".")
        if parts[0] not in partly:
            names.append(parts[0])
            continue
        shown = [parts[0]]
        for part in parts[1:-1]:
            shown.append("*" if part.isdigit() else part)
            if not part.isdigit():
                break
        names.append(".".join(shown))
    names = list(dict.fromkeys(names))
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


# ----------------------------------------------------------------------------- reading
def unwrap_state_dict(content: object, label: str) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file, with checkpoint wrappers and common key prefixes removed."""
    for _ in range(3):  # {"state_dict": {"model": ...}} and the like
        if isinstance(content, dict) and not any(isinstance(v, torch.Tensor) for v in content.values()):
            inner = next((content[k] for k in WRAPPER_KEYS if isinstance(content.get(k), dict)), None)
            if inner is None:
                break
            content = inner
    if not isinstance(content, dict):
        raise UserError(f"--pretrained {label}: holds a {type(content).__name__}, not a state_dict")
    tensors = {k: v for k, v in content.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"--pretrained {label}: no tensors found (expected a state_dict, or a checkpoint dict "
                        f"holding one under {' / '.join(WRAPPER_KEYS)})")
    changed = True
    while changed:  # "module.backbone.conv1.weight" -> "conv1.weight"
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                changed = True
    return tensors


def imagenet_state_dict(family: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights through its own weights API (the torch hub cache, downloaded
    there on a machine with internet), and a label for them."""
    from torchvision import models as tv

    weights = tv.ResNet50_Weights.IMAGENET1K_V1 if family == "resnet" else tv.GoogLeNet_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=False), f"imagenet ({weights})"
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a truncated download a RuntimeError
        raise UserError(f"--pretrained imagenet: torchvision's {weights} are not in the torch cache and could not "
                        f"be downloaded ({type(error).__name__}); put {weights.url} at {cached}, or pass "
                        "--pretrained PATH") from None


# ----------------------------------------------------------------------------- key mapping
def resnet_key(key: str) -> str | None:
    """torchvision ResNet-50 key -> this project's (stem in layers0, stages in layers1-4); None for fc."""
    if key.startswith(("conv1.", "bn1.")):
        return "layers0." + key
    match = re.match(r"layer([1-4])\.(.*)", key)
    return f"layers{match.group(1)}.{match.group(2)}" if match else None


GOOGLENET_STEM = {"conv1.conv": "prelayer.0", "conv1.bn": "prelayer.1", "conv3.conv": "prelayer.4",
                  "conv3.bn": "prelayer.5"}
GOOGLENET_BRANCH = {"branch1.conv": "b1.0", "branch1.bn": "b1.1", "branch2.0.conv": "b2.0", "branch2.0.bn": "b2.1",
                    "branch2.1.conv": "b2.3", "branch2.1.bn": "b2.4", "branch3.0.conv": "b3.0", "branch3.0.bn": "b3.1",
                    "branch3.1.conv": "b3.3", "branch3.1.bn": "b3.4", "branch4.1.conv": "b4.1", "branch4.1.bn": "b4.2"}


def googlenet_key(key: str) -> str | None:
    """torchvision GoogLeNet key -> ABE_M's (stem in prelayer, inception3a -> a3 ... 5b -> b5)."""
    module, _, leaf = key.rpartition(".")
    if module in GOOGLENET_STEM:
        return f"{GOOGLENET_STEM[module]}.{leaf}"
    match = re.match(r"inception([345][a-e])\.(.*)", module)
    if match and match.group(2) in GOOGLENET_BRANCH:
        block = match.group(1)[1] + match.group(1)[0]  # "3a" -> "a3"
        return f"{block}.{GOOGLENET_BRANCH[match.group(2)]}.{leaf}"
    return None


KEY_MAPS = {"resnet": resnet_key, "googlenet": googlenet_key}


def load_pretrained(model: nn.Module, model_name: str, source: str) -> PretrainedReport:
    """Copy the tensors of `source` ("imagenet" or a state_dict file in torchvision's layout) that
    fit `model` into it; raises UserError for a file that fits nothing."""
    family = FAMILY[model_name]
    if source == "imagenet":
        tensors, label = imagenet_state_dict(family)
    else:
        if not Path(source).is_file():
            raise UserError(f"--pretrained {source}: no such file (pass a state_dict file, or imagenet)")
        tensors, label = unwrap_state_dict(read_torch_file(source, label=os.path.basename(source)), source), source
    own = model.state_dict()
    key_map = KEY_MAPS[family]
    report = PretrainedReport(label, family, file_keys=list(tensors))
    updates = {}
    for key, value in tensors.items():
        target = key_map(key) if key not in own else key  # a file already in this project's layout
        if target is None or target not in own:
            report.unused.append(key)
        elif own[target].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
            report.unused.append(key)
        else:
            updates[target] = value
    if not updates:
        why = f"the shapes differ, first: {report.mismatched[0]}" if report.mismatched else \
            f"none of its keys is a {family} key (first: {next(iter(tensors))})"
        raise UserError(f"--pretrained {label}: fits nothing of {model_name} ({why}); pass a torchvision-layout "
                        f"{'ResNet-50' if family == 'resnet' else 'GoogLeNet'} state_dict")
    # ABE_M's convolutions have a bias, torchvision's GoogLeNet's (followed by BN) none: zeroing it
    # makes conv + BN compute what the file's did, where its initial value would shift every output.
    zeroed = [key for key in own if key.endswith(".bias") and key not in updates
              and updates.get(key[:-5] + ".weight", torch.empty(0)).dim() == 4]
    with torch.no_grad():
        for target, value in updates.items():
            own[target].copy_(value.to(own[target].dtype))
        for key in zeroed:
            own[key].zero_()
    report.loaded = sorted(updates)
    report.zeroed = zeroed
    left = set(updates) | set(zeroed)
    report.new = [key for key in own if key not in left]
    return report
