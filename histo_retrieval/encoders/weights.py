"""Weights files: the one reader of .pth/.bin files (torch.save) and .safetensors, the check that a
state_dict fits a model, and the hash that names weights whatever file holds them.

    state_dict = read_weights("pytorch_model.bin")        # .pth, .bin or .safetensors; one-line errors
    problem = state_dict_mismatch(model.state_dict(), state_dict)   # '' when keys and shapes fit
    tensors_sha256(model.state_dict())                     # the identity an index records
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Mapping

import torch

from histo_retrieval.errors import UserError, one_line

# How torch.save's files begin: a zip archive (the format since PyTorch 1.6), or the legacy format's
# pickle (protocol 2 or later).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Keys under which training frameworks nest a state_dict (DINO's "teacher", Lightning's "state_dict").
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "teacher")


class CheckpointError(UserError):
    """A checkpoint file that cannot be evaluated (corrupt, not a checkpoint, wrong architecture)."""


def read_torch_file(path: str | os.PathLike, mmap: bool = False, label: str | None = None) -> Any:
    """The content of a .pth file (tensors on the CPU, weights_only); CheckpointError naming the file
    (as `label`, default its path) when it is missing, not written by torch.save, damaged, or holds
    objects that only an unsafe load could rebuild. `mmap` leaves the tensors on disk (zip-format
    files only)."""
    label = label or os.fspath(path)
    try:
        with open(path, "rb") as file:
            head = file.read(len(TORCH_FILE_MAGIC[0]))
    except FileNotFoundError:
        raise CheckpointError(f"{label}: no such file") from None
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read ({one_line(err)})") from None
    # Checked first: PyTorch's own error for a foreign file is a bare number or advice to load it unsafely.
    if not head.startswith(TORCH_FILE_MAGIC):
        what = "an empty file" if not head else "neither the zip archive nor the pickle that torch.save writes"
        raise CheckpointError(f"{label}: not a PyTorch checkpoint ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for damaged files
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise CheckpointError(f"{label}: holds Python objects besides tensors and plain data, which are not "
                                  "loaded (they could run code); save the model's state_dict or a train.py "
                                  "checkpoint") from None
        raise CheckpointError(f"{label}: a damaged PyTorch checkpoint ({_first_sentence(err)})") from None


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's first line: PyTorch follows it with advice that does not apply."""
    return one_line(err).split(". ")[0].rstrip(".")



def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """'' when `found` has exactly the keys and shapes of `expected`, else a short description."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], torch.Tensor) and found[k].shape != v.shape]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(problems)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a .safetensors file, or a .pth/.bin file holding a state_dict
    (or one nested under "state_dict", "model" or "teacher"); CheckpointError naming the file otherwise."""
    label = os.fspath(path)
    if label.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not os.path.isfile(label):
            raise CheckpointError(f"{label}: no such file")
        try:
            return load_file(label, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{label}: a damaged safetensors file ({_first_sentence(err)})") from None
    content = read_torch_file(path)
    for key in NESTED_STATE_DICT_KEYS:
        if isinstance(content, dict) and _is_tensor_dict(content.get(key)):
            content = content[key]
            break
    if not _is_tensor_dict(content):
        raise CheckpointError(f"{label}: holds no state_dict (a dict of tensor names to tensors)")
    return content


def _is_tensor_dict(content: Any) -> bool:
    return isinstance(content, dict) and bool(content) and all(isinstance(v, torch.Tensor) for v in content.values())


def tensors_sha256(state_dict: Mapping[str, torch.Tensor], salt: str = "") -> str:
    """SHA-256 of the tensors in key order (names, dtypes, shapes and bytes), after `salt`: the same
    weights give the same hash whatever file or wrapper they were saved in. `salt` names what has no
    tensors (the colour histogram's bins)."""
    digest = hashlib.sha256(salt.encode())
    for key, value in sorted(state_dict.items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
