"""train.py --freeze-trunk: a projection head trained with the paper's losses on a frozen encoder.

    python3 train.py timm:vit_small_patch16_224 MSLoss --freeze-trunk --encoder-weights vit_s.safetensors
    python3 train.py uni MSLoss --freeze-trunk --head mlp --head-dim 256

The first argument is any spec of histo_retrieval.encoders.load_encoder (timm:<architecture>, a preset,
histogram, a checkpoint of this project). Only the head (models.ProjectionHead) learns. Without
augmentation (--augment none, the default here) every image goes through the encoder's own input steps,
so its vector is the same in every epoch: the trunk runs once over the training and validation images
(`cache_vectors`, float32 N x D in memory) and an epoch costs the head alone. With --augment reference
or stain (the flips and random crop after the encoder's resize), or --no-feature-cache, the trunk runs
on every step, frozen (histo_retrieval.encoders.frozen.TrunkAndHead). The epochs, checkpoints, log and
resume are train.py's own; the checkpoint adds the trunk's record and loads like any other.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import models
from histo_retrieval.data.datasets import KimiaDataset, eval_transform, train_transform
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.frozen import TrunkAndHead, frozen_model_name, trunk_record
from histo_retrieval.encoders.project import REFERENCE_CROP_SIZE
from histo_retrieval.encoders.registry import RANDOM_WEIGHTS, load_encoder, parse_encoder_options
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.training.loop import NO_AUGMENT, ResolvedNames, build_loaders, resolve_loss

__all__ = ["CachedVectors", "FrozenTrunk", "add_frozen_arguments", "cache_vectors", "check_frozen_arguments",
           "frozen_names", "vector_loaders"]

DEFAULT_HEAD_DIM = 512


def add_frozen_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--freeze-trunk and the flags of its head and encoder."""
    group = parser.add_argument_group("frozen trunk (a projection head on an encoder; docs/own_tissue.md)")
    group.add_argument("--freeze-trunk", action="store_true",
                       help="the first argument is an encoder (timm:<architecture>, a preset, histogram or a checkpoint "
                            "file): train only a projection head on its vectors; without augmentation (--augment none, "
                            "the default then) the vectors are computed once and cached (default: off)")
    group.add_argument("--head", choices=models.HEADS, default="linear",
                       help="linear: one linear layer; mlp: two with a ReLU, as many hidden units as the encoder's "
                            "vector (default: %(default)s)")
    group.add_argument("--head-dim", type=int, default=DEFAULT_HEAD_DIM,
                       help="the head's output, the embedding size (default: %(default)s)")
    group.add_argument("--encoder-weights", default=None, metavar="FILE",
                       help="state_dict of a timm: or preset trunk (.pth, .bin or .safetensors), or "
                            f"'{RANDOM_WEIGHTS}' for a randomly initialised timm network (default: none; a preset "
                            "looks in its weights folder and the Hugging Face cache)")
    group.add_argument("--encoder-options", type=parse_encoder_options, default=None, metavar="JSON",
                       help="the trunk's timm create_model keyword arguments, e.g. '{\"dynamic_img_size\": true}'; "
                            "for the histogram, '{\"bins\": 8}' (default: none)")
    group.add_argument("--no-feature-cache", action="store_true",
                       help="run the trunk on every step even without augmentation: the same losses as the cache, "
                            "slower (default: off)")
    return parser


def check_frozen_arguments(args: argparse.Namespace, frozen: bool) -> None:
    """Refuse the frozen-trunk flags without --freeze-trunk, and with it the flags of a model trained
    whole (UserError naming the flag)."""
    if not frozen:
        given = [flag for flag, value, default in (
            ("--head", getattr(args, "head", "linear"), "linear"),
            ("--head-dim", getattr(args, "head_dim", DEFAULT_HEAD_DIM), DEFAULT_HEAD_DIM),
            ("--encoder-weights", getattr(args, "encoder_weights", None), None),
            ("--encoder-options", getattr(args, "encoder_options", None), None),
            ("--no-feature-cache", getattr(args, "no_feature_cache", False), False)) if value != default]
        if given:
            raise UserError(f"{given[0]} is for --freeze-trunk (a head on a frozen encoder); add --freeze-trunk")
        return
    whole = [flag for flag, used in (("--pretrained", args.pretrained), ("--no-attention", args.no_attention),
                                     ("--num-learners", args.num_learners is not None),
                                     ("--stain-normalize", args.stain_normalize != "none"),
                                     ("--gather-embeddings", args.gather_embeddings)) if used]
    if whole:
        raise UserError(f"{whole[0]} is for a model trained whole; with --freeze-trunk the encoder's own weights and "
                        "input steps are used")
    if args.embedding_dim != DEFAULT_HEAD_DIM:
        raise UserError(f"--embedding-dim {args.embedding_dim}: with --freeze-trunk the embedding is the head's; "
                        "use --head-dim")
    if args.head_dim < 1:
        raise UserError(f"--head-dim must be at least 1, got {args.head_dim}")


def frozen_names(args: argparse.Namespace) -> ResolvedNames:
    """The run's names: model `<trunk>-frozen-<head>` (so its identity is `<trunk>-frozen-<head>_<loss>`),
    the loss and its options."""
    loss_name, loss_options = resolve_loss(args)
    return ResolvedNames(frozen_model_name(args.model, args.head), loss_name,
                         {"embedding_dim": args.head_dim, "head": args.head}, loss_options)


# ----------------------------------------------------------------------------- the cache
class CachedVectors(Dataset):
    """A data set's images as their trunk's vectors, computed once: items as KimiaDataset's
    (vector, label, path), or SkipUnreadable's marker (None, None, (path, reason)) for an image that
    could not be decoded, so that train.py's loaders, samplers and collate take it unchanged."""

    def __init__(self, dataset: KimiaDataset, vectors: torch.Tensor, rows: dict[int, int],
                 failed: dict[int, str]) -> None:
        self.samples, self.classes = dataset.samples, dataset.classes
        self.vectors, self.rows, self.failed = vectors, rows, failed
        self.transform = None  # build_loaders sets it; the vectors need none

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.samples[index]
        row = self.rows.get(index)
        if row is None:
            return None, None, (path, self.failed.get(index, "not among the cached images"))
        return self.vectors[row], label, path


def cache_vectors(trunk: Encoder, dataset: KimiaDataset, indices: list[int], device: torch.device,
                  args: argparse.Namespace) -> CachedVectors:
    """The trunk's vectors (float32 N x D, on the CPU) of the images `indices` names, each through the
    encoder's input steps and preprocessing as every tool embeds it (histo_retrieval.evaluation.embedder)."""
    indices = sorted(set(indices))
    paths = [dataset.samples[i][0] for i in indices]
    embedder = Embedder(trunk.model, device, args.batch_size, args.amp, args.channels_last, trunk.preprocessing)
    vectors, kept, failed = embedder.embed_files(paths, trunk.input_steps, args.workers)
    by_path = {path: index for index, path in zip(indices, paths)}
    return CachedVectors(dataset, vectors.float(), {indices[position]: row for row, position in enumerate(kept)},
                         {by_path[path]: reason for path, reason in failed})


def vector_loaders(args: argparse.Namespace, vectors: CachedVectors, train_indices: list[int], val_indices: list[int],
                   device: torch.device) -> tuple[DataLoader, DataLoader]:
    """train.py's loaders (build_loaders: the same batches, seeded the same way) over cached vectors."""
    # The vectors are in memory: loader processes would only copy them.
    return build_loaders(argparse.Namespace(**{**vars(args), "workers": 0}), vectors, train_indices, val_indices,
                         device, 0, 1, None, (None, None))


# ----------------------------------------------------------------------------- the run
class FrozenTrunk:
    """The trunk of a --freeze-trunk run, with what train.py needs of it: the head, the loaders and
    the model each step runs (the head on cached vectors, or trunk then head)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.encoder = load_encoder(args.model, device, args.encoder_weights, args.encoder_options)
        self.encoder.model.requires_grad_(False).eval()
        self.record = trunk_record(self.encoder, args.model, args.encoder_options)
        self.cached = args.augment == NO_AUGMENT and not args.no_feature_cache

    def take_crop_size(self) -> None:
        """Set --crop-size to the encoder's input size (recorded with the checkpoint); UserError when the
        command asks for another one."""
        crop = self.encoder.crop_size
        if self.args.crop_size not in (REFERENCE_CROP_SIZE, crop):  # 224: --crop-size's default
            raise UserError(f"--crop-size {self.args.crop_size}: with --freeze-trunk the input steps are the "
                            f"encoder's ({self.encoder.input_steps.describe()}); leave --crop-size out")
        self.args.crop_size = crop

    @property
    def needs_crop_check(self) -> bool:
        """Whether the images must be at least the crop (no resize before it)."""
        return self.encoder.input_steps.resize is None

    def build_head(self) -> tuple[nn.Module, dict[str, Any]]:
        """A fresh head and the model_options its checkpoint records."""
        head = models.build_head(self.args.head, self.encoder.dim, self.args.head_dim)
        return head, {"embedding_dim": self.args.head_dim, "head": self.args.head, **models.head_options(head)}

    def whole(self, head: nn.Module) -> TrunkAndHead:
        return TrunkAndHead(self.encoder.model, head)

    def loaders(self, dataset: KimiaDataset, train_indices: list[int], val_indices: list[int],
                device: torch.device, verbose: bool) -> tuple[DataLoader, DataLoader]:
        """train.py's loaders (build_loaders: the same batches, seeded the same way) over the cached
        vectors, or over the images through the trunk's input steps (with the augmentation asked for)."""
        if not self.cached:
            if verbose:
                why = f"--augment {self.args.augment}" if self.args.augment != NO_AUGMENT else "--no-feature-cache"
                print(f"trunk {self.encoder.describe()}: runs on every step ({why}), frozen", flush=True)
            steps = eval_transform(self.encoder.input_steps, self.encoder.preprocessing)
            train = steps if self.args.augment == NO_AUGMENT else self.augment_transform()
            return build_loaders(self.args, dataset, train_indices, val_indices, device, 0, 1,
                                 self.encoder.preprocessing, (train, steps))
        started = time.perf_counter()
        vectors = cache_vectors(self.encoder, dataset, list(train_indices) + list(val_indices), device, self.args)
        if verbose:
            print(f"trunk {self.encoder.describe()}: {len(vectors.rows)} images' vectors ({vectors.vectors.shape[1]}-d) "
                  f"cached in {time.perf_counter() - started:.1f} s; each epoch trains the head alone", flush=True)
        return vector_loaders(self.args, vectors, train_indices, val_indices, device)

    def augment_transform(self) -> Callable:
        """--augment reference or stain on the encoder's input: its resize (if any), then the reference's
        flips and random crop at its crop size (and the stain variation), then its preprocessing."""
        steps = self.encoder.input_steps
        augment = train_transform(steps.crop_size, self.args.augment, self.encoder.preprocessing)
        if steps.resize is None:
            return augment
        return transforms.Compose([transforms.Resize(steps.resize, transforms.InterpolationMode(steps.interpolation)),
                                   augment])

    def step_args(self) -> argparse.Namespace:
        """The arguments train_one_epoch and validate see: a head on cached vectors takes n x D rows,
        which have no channels_last layout."""
        return argparse.Namespace(**{**vars(self.args), "channels_last": False}) if self.cached else self.args
