"""The pieces of train.py's training run: options, data, model and loss, one epoch, validation, resume.

    parser = add_training_arguments(argparse.ArgumentParser())    # every option but the model and loss
    names = resolve_names(args)                                   # canonical names and their options
    files = RunFiles(args.output_dir, names.identity)             # the run's file names; refuse_other_run(files)
    dataset, train_indices, val_indices, num_images = build_datasets(args)
    train_loader, val_loader = build_loaders(args, dataset, train_indices, val_indices, device, rank, world_size)
    stats = train_one_epoch(model, criterion, optimizer, train_loader, device, args, scaler, epoch, show_progress)
    val_loss, unreadable = validate(model, criterion, val_loader, device, args)

train.py orchestrates them (the epoch loop, checkpoints, the log); train_traindata.py shares the
arguments and the names. Every default is the reference code's (docs/reproduction.md, "Training").
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import losses
import models
from histo_retrieval.figures import pyplot, save_figure

from histo_retrieval.evaluation.checkpoint import last_epoch_name, run_identity
from histo_retrieval.encoders.weights import CheckpointError, read_torch_file
from histo_retrieval.encoders.project import is_training_checkpoint
from histo_retrieval.data.datasets import (AUGMENTS, InputSteps, KimiaDataset, SkipUnreadable, collate_readable, eval_transform, split_train_val,
                   subsample_per_class, train_transform)
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.training.pretrained import load_pretrained
from histo_retrieval.distributed import all_reduce_sum, gather_with_grad
from histo_retrieval.errors import UserError
from histo_retrieval.images import UNREADABLE
from histo_retrieval.runtime import AMP_DTYPES, add_runtime_args, seed_everything
from histo_retrieval.data.sampler import PKBatchSampler, ValidationBatches
from histo_retrieval.evaluation.selection import LOSS_IN_NAME

# Per loss: its build_loss keyword -> the parser destination of its flag. Only the chosen loss's own
# hyper-parameters are passed to it.
LOSS_OPTION_DESTS = {
    "ContrastiveLoss": {"margin": "margin", "self_pair": "self_pair"},
    "ABELoss": {"lambda_div": "lambda_div", "margin_c": "margin_c", "margin_div": "margin_div", "self_pair": "self_pair"},
    "MSLoss": {"alpha": "ms_alpha", "beta": "ms_beta", "lam": "ms_lambda", "eps": "ms_eps", "self_pair": "self_pair"},
}
# Settings a resumed run must share with its checkpoint's (argument destinations); --epochs may grow, and
# the runtime ones (device, precision, memory format, workers) only change rounding.
RESUME_SETTINGS = ("seed", "val_ratio", "val_batches", "data_ratio", "batch_size", "sampler", "samples_per_class",
                   "crop_size", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma", "lr_step_at", "pretrained",
                   "augment", "stain_normalize", "stain_target")
NO_AUGMENT = "none"  # --augment none: --freeze-trunk's default, which lets the trunk's vectors be cached
PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one reads the loss from the device)


# ----------------------------------------------------------------------------- arguments
def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of train.py but the model and loss names (train_traindata.py shares them), with
    the runtime flags of `histo_retrieval.runtime.add_runtime_args`.

    Help strings use %(default)s so that a script changing a default with set_defaults shows its own.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="KIMIA_data/train", help="folder of class folders (default: %(default)s)")
    data.add_argument("--output-dir", default="model", help="checkpoints, log and plot go here (default: %(default)s)")
    data.add_argument("--val-ratio", type=float, default=0.1,
                      help="share of the images held out for the validation loss, drawn with --seed (default: %(default)s)")
    data.add_argument("--data-ratio", type=float, default=1.0,
                      help="keep int(n_c * r) images of each class, drawn with --seed (default: %(default)s)")
    data.add_argument("--crop-size", type=int, default=224,
                      help="random (training) and centre (validation) crop of the images (default: %(default)s)")
    data.add_argument("--val-batches", choices=("reference", "fixed"), default="reference",
                      help="reference: the validation images reshuffled each epoch (seeded) and the last partial batch "
                           "dropped, as the reference's loader; fixed: the same batches every epoch, the last one "
                           "partial, so that the validation loss compares across epochs (default: %(default)s)")
    data.add_argument("--sampler", choices=("random", "pk"), default="random",
                      help="random: shuffled batches as the reference; pk: P classes x K images per batch (default: %(default)s)")
    data.add_argument("--samples-per-class", type=int, default=5,
                      help="K of the pk sampler; --batch-size must be a multiple of it (default: %(default)s)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=100, help="number of epochs (default: %(default)s)")
    optim.add_argument("--batch-size", type=int, default=60,
                       help="images per step and per process; the last partial batch is dropped (default: %(default)s)")
    optim.add_argument("--lr", type=float, default=0.001, help="SGD learning rate (default: %(default)s)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default: %(default)s)")
    optim.add_argument("--lr-step", type=int, default=50, help="StepLR: epochs between decays (default: %(default)s)")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="StepLR: decay factor (default: %(default)s)")
    optim.add_argument("--lr-step-at", choices=("end", "start"), default="end",
                       help="when StepLR steps: end of each epoch, which gives the paper's schedule (and the reference "
                            "code's on PyTorch < 1.1); start of each epoch, which gives the reference code's schedule "
                            "on PyTorch >= 1.1, one epoch earlier per decay (default: %(default)s)")
    optim.add_argument("--seed", type=int, default=1,
                       help="seeds the split, the weights, the data order and the augmentation (default: %(default)s)")
    optim.add_argument("--gather-embeddings", action="store_true",
                       help="under torchrun, compute the loss over the batches of all processes together, as the "
                            "reference's DataParallel did, instead of within each process's batch (default: off)")

    model = parser.add_argument_group("model")
    model.add_argument("--embedding-dim", type=int, default=512,
                       help="total embedding size, split over the learners (default: %(default)s)")
    model.add_argument("--num-learners", type=int, default=None,
                       help="learners M (default: the model's own, 1 for se_resnet50 and 4 for the others)")
    model.add_argument("--no-attention", action="store_true",
                       help="se_resnet50 without its mixed-attention branch, the paper's ablation (default: off)")

    start = parser.add_argument_group("pretrained start and stain (beyond the paper; off by default)")
    start.add_argument("--pretrained", default=None, metavar="PATH|imagenet",
                       help="initialise the backbone from a torchvision-layout ResNet-50 (resnet50, se_resnet50) or "
                            "GoogLeNet (ABE_M) state_dict file, or from torchvision's ImageNet weights; inputs are "
                            "then normalised as those weights expect (default: none, random initialisation)")
    start.add_argument("--augment", choices=(*AUGMENTS, NO_AUGMENT), default=None,
                       help="reference: the paper's flips and random crop; stain: adds HED stain, brightness and "
                            "contrast variation after the crop; none: no augmentation, each image through the "
                            "encoder's own input steps (--freeze-trunk only, whose trunk vectors are then computed "
                            "once and cached) (default: reference; none with --freeze-trunk)")
    start.add_argument("--stain-normalize", choices=("none", "macenko"), default="none",
                       help="macenko: normalise every patch to --stain-target's stain, in training and in every tool "
                            "that embeds with the checkpoint (default: %(default)s)")
    start.add_argument("--stain-target", default=None, metavar="IMAGE",
                       help="the image whose stain --stain-normalize macenko matches (default: none)")

    loss = parser.add_argument_group("loss hyper-parameters (each used only by its loss; defaults are the reference's)")
    loss.add_argument("--self-pair", choices=("reference", "exclude"), default="reference",
                      help="reference: an anchor's positives are its class's similarities below 1, as the reference "
                           "code tests, so about half the anchors keep themselves; exclude: the anchor itself is "
                           "dropped by index, the clean rule (default: %(default)s)")
    loss.add_argument("--margin", type=float, default=0.5, help="ContrastiveLoss negative margin (default: %(default)s)")
    loss.add_argument("--lambda-div", type=float, default=0.05, help="ABELoss divergence weight (default: %(default)s)")
    loss.add_argument("--margin-c", type=float, default=0.5, help="ABELoss positive margin (default: %(default)s)")
    loss.add_argument("--margin-div", type=float, default=0.2, help="ABELoss divergence margin (default: %(default)s)")
    loss.add_argument("--ms-alpha", type=float, default=2.0, help="MSLoss positive scale alpha (default: %(default)s)")
    loss.add_argument("--ms-beta", type=float, default=5.0, help="MSLoss negative scale beta (default: %(default)s)")
    loss.add_argument("--ms-lambda", type=float, default=0.5, help="MSLoss similarity offset lambda (default: %(default)s)")
    loss.add_argument("--ms-eps", type=float, default=0.2, help="MSLoss mining margin epsilon (default: %(default)s)")

    add_runtime_args(parser, workers_note="that many in each training process, seeded from --seed and the epoch, so "
                                          "that a resumed run with the same --workers repeats the augmentation")
    run = parser.add_argument_group("run")
    run.add_argument("--keep-best", type=int, default=0, metavar="K",
                     help="keep only the K most recent best checkpoints this run wrote; 0 keeps them all, as the "
                          "reference (default: %(default)s)")
    run.add_argument("--save-bare-state-dict", action="store_true",
                     help="write the best-validation files as bare state_dicts, as the reference does, so that the "
                          "reference's multi_test.py reads them; <run>_checkpoint.pth keeps everything (default: off)")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="continue from a checkpoint written by this script, at the epoch after it; refused when "
                          "its settings or training files differ from this command's, but --epochs may grow "
                          "(default: none)")
    run.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="also write the losses, learning rate, speed and skipped batches of each epoch, and at the "
                          "end the validation embeddings for the embedding projector, to this TensorBoard log folder "
                          "(default: none)")
    run.add_argument("--summary", action="store_true",
                     help="print the model's layers and parameter counts, then exit (default: off)")
    return parser


def resolve_augment(args: argparse.Namespace) -> None:
    """Fill in --augment's default: reference, or none with --freeze-trunk (UserError for none without it)."""
    frozen = getattr(args, "freeze_trunk", False)
    if args.augment is None:
        args.augment = NO_AUGMENT if frozen else "reference"
    elif args.augment == NO_AUGMENT and not frozen:
        raise UserError("--augment none is for --freeze-trunk (a head on a frozen encoder); a model trained whole "
                        "takes --augment reference or stain")


def check_training_arguments(args: argparse.Namespace) -> None:
    """Refuse numbers below their least meaningful value and flags that need another (UserError naming the flag)."""
    for flag, value, minimum in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 2),
                                 ("--crop-size", args.crop_size, 1), ("--keep-best", args.keep_best, 0)):
        if value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")
    if args.stain_normalize == "macenko" and not args.stain_target:
        raise UserError("--stain-normalize macenko needs --stain-target IMAGE, a patch whose stain the others match")
    if args.stain_target and args.stain_normalize == "none":
        raise UserError(f"--stain-target {args.stain_target} is used only with --stain-normalize macenko")


def start_model(model: nn.Module, model_name: str, args: argparse.Namespace,
                verbose: bool = True) -> tuple[Preprocessing, dict | None]:
    """A new run's pretrained weights (printing what was loaded) and input preprocessing: the
    normalisation the weights expect, and the stain normalisation to --stain-target."""
    mean = std = report = None
    if args.pretrained:
        report = load_pretrained(model, model_name, args.pretrained)
        mean, std = report.normalization
        if verbose:
            print(report.summary(), flush=True)
    stain = None
    if args.stain_normalize == "macenko":
        from histo_retrieval.data.stain import load_stain_target  # torchstain and scikit-image only when asked for
        stain = load_stain_target(args.stain_target).state()
    return Preprocessing(mean, std, stain), report.record() if report else None


# ----------------------------------------------------------------------------- model and loss
class ResolvedNames(NamedTuple):
    """A command's model and loss in canonical spelling, with the options they are built with."""

    model_name: str
    loss_name: str
    requested_model_options: dict[str, Any]  # build_model options the command sets (num_learners only when given)
    loss_options: dict[str, Any]  # build_loss options: the chosen loss's hyper-parameters only

    @property
    def identity(self) -> str:
        """The run identity that names the run's files (histo_retrieval.evaluation.checkpoint.run_identity)."""
        return run_identity(self.model_name, self.requested_model_options, self.loss_name, self.loss_options)


def resolve_names(args: argparse.Namespace) -> ResolvedNames:
    """The command's model and loss names and options; UserError for an unknown name or an option the
    model does not take."""
    try:
        model_name = models.canonical_model_name(args.model)
    except ValueError as err:
        raise UserError(f"{err}, or add --freeze-trunk to train a projection head on an encoder "
                        "(timm:<architecture>, a preset, histogram or a checkpoint file)") from None
    loss_name, loss_options = resolve_loss(args)
    requested: dict[str, Any] = {"embedding_dim": args.embedding_dim}
    if args.num_learners is not None:
        requested["num_learners"] = args.num_learners
    if model_name == "se_resnet50":
        requested["attention"] = not args.no_attention
    elif args.no_attention:
        raise UserError(f"--no-attention applies to se_resnet50 only, not {model_name}")
    return ResolvedNames(model_name, loss_name, requested, loss_options)


def resolve_loss(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The command's loss name in canonical spelling and its own hyper-parameters; UserError if unknown."""
    try:
        loss_name = losses.canonical_loss_name(args.loss)
    except ValueError as err:
        raise UserError(str(err)) from None
    return loss_name, {key: getattr(args, dest) for key, dest in LOSS_OPTION_DESTS[loss_name].items()}


def build_training_model(model_name: str, requested_options: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model and its model_options, the complete set stored with its checkpoints (the learner
    count filled in from the model's default); UserError for options the model refuses."""
    try:
        model = models.build_model(model_name, **requested_options)
    except ValueError as err:
        raise UserError(f"{model_name}: {err}") from None
    return model, {**requested_options, "num_learners": model.num_learners}


# ----------------------------------------------------------------------------- data
def build_datasets(args: argparse.Namespace, check_crop: bool = True) -> tuple[KimiaDataset, list[int], list[int], int]:
    """The data set and its (train, validation) indices after the --data-ratio cut; also the images used.

    Raises UserError for a class too small for the cut or the split, and (with `check_crop`; an
    encoder whose input steps resize first needs none) for a --crop-size larger than the images.
    """
    dataset = KimiaDataset(args.data_dir)
    if not 0.0 < args.data_ratio <= 1.0:
        raise UserError(f"--data-ratio must be in (0, 1], got {args.data_ratio}")
    kept = subsample_per_class(dataset.targets, args.data_ratio, args.seed) if args.data_ratio < 1.0 else list(range(len(dataset)))
    train_part, val_part = split_train_val(len(kept), args.val_ratio, args.seed)
    train_indices, val_indices = [kept[i] for i in train_part], [kept[i] for i in val_part]
    if check_crop:
        check_crop_size(dataset, args.crop_size)
    if not val_indices:
        raise UserError(f"--val-ratio {args.val_ratio} leaves no validation image among {len(kept)}; raise it")
    train_counts = [0] * len(dataset.classes)
    for index in train_indices:
        train_counts[dataset.samples[index][1]] += 1
    for name, count in zip(dataset.classes, train_counts):
        if count < 2:
            raise UserError(f"{Path(args.data_dir) / name}: {count} image(s) left for training after the "
                            f"--data-ratio {args.data_ratio} cut and the --val-ratio {args.val_ratio} split; each "
                            "class needs at least 2 to form positive pairs: add images or raise the ratios")
    return dataset, train_indices, val_indices, len(kept)


def check_crop_size(dataset: KimiaDataset, crop_size: int) -> None:
    """Refuse a crop larger than the images (judged on the first readable one), which would
    otherwise make every image fail in the loader."""
    from PIL import Image

    for path, _ in dataset.samples:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except UNREADABLE:
            continue
        if crop_size > min(width, height):
            raise UserError(f"--crop-size {crop_size} is larger than the images ({path} is {width}x{height}); "
                            "lower --crop-size")
        return


def build_loaders(args: argparse.Namespace, dataset: KimiaDataset, train_indices: list[int], val_indices: list[int],
                  device: torch.device, rank: int, world_size: int,
                  preprocessing: Preprocessing | None = None,
                  transforms: tuple[Callable | None, Callable | None] | None = None) -> tuple[DataLoader, DataLoader]:
    """Training loader (random or P x K, sharded over processes) and validation loader (ValidationBatches).
    `transforms`: (training, validation) transforms in place of the reference's (train.py --freeze-trunk:
    its trunk's input steps, or None for a data set of cached vectors).

    Workers are started anew each epoch with seeds drawn from the loader's generator, which the
    epoch loop seeds from (seed, epoch, rank): persistent workers would carry their random streams
    from one epoch into the next, and a resumed run would not repeat them.
    """
    if preprocessing is not None and preprocessing.stain:
        _ = preprocessing.stain_normalizer  # made here, so that the workers share its count of pass-throughs
    if transforms is None:
        transforms = (train_transform(args.crop_size, args.augment, preprocessing),
                      eval_transform(args.crop_size, preprocessing))
    train_set = copy.copy(dataset)
    train_set.transform = transforms[0]
    val_set = copy.copy(dataset)
    val_set.transform = transforms[1]
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=collate_readable)
    train_data = SkipUnreadable(train_set, train_indices)
    if args.sampler == "pk":
        labels = [dataset.samples[i][1] for i in train_indices]
        batch_sampler = PKBatchSampler(labels, args.batch_size, args.samples_per_class, world_size, rank, args.seed)
        train_loader = DataLoader(train_data, batch_sampler=batch_sampler, generator=torch.Generator(), **common)
    else:
        sampler = DistributedSampler(train_data, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                  generator=torch.Generator(), **common)
    if len(train_loader) == 0:
        per_process = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise UserError(f"--batch-size {args.batch_size}{per_process} is larger than the {len(train_indices)} training "
                        f"images{' shared among them' if world_size > 1 else ''}; lower --batch-size")
    val_batches = ValidationBatches(len(val_indices), args.batch_size, args.val_batches, args.seed, world_size, rank)
    if val_batches.stop == 0:
        raise UserError(f"--val-batches reference drops the last partial batch, and the {len(val_indices)} validation "
                        f"images make no full batch of {args.batch_size}; raise --val-ratio, lower --batch-size or "
                        "use --val-batches fixed")
    val_loader = DataLoader(SkipUnreadable(val_set, val_indices), batch_sampler=val_batches, **common)
    return train_loader, val_loader


def seed_epoch(train_loader: DataLoader, val_loader: DataLoader, seed: int, epoch: int, rank: int,
               world_size: int) -> None:
    """Seed everything random in `epoch` from (seed, epoch, rank) alone (and --workers, through the
    loader's worker count), so that a resumed run repeats the epochs it continues."""
    epoch_seed = seed + epoch * world_size + rank
    seed_everything(epoch_seed)  # the augmentation in the main process (--workers 0)
    train_loader.generator.manual_seed(epoch_seed)  # the workers' seeds, drawn anew each epoch
    pk_batches = isinstance(train_loader.batch_sampler, PKBatchSampler)
    epoch_sampler = train_loader.batch_sampler if pk_batches else train_loader.sampler
    epoch_sampler.set_epoch(epoch)
    val_loader.batch_sampler.set_epoch(epoch)


# ----------------------------------------------------------------------------- one epoch
def learner_embeddings(model: nn.Module, images: torch.Tensor, device: torch.device,
                       args: argparse.Namespace) -> list[torch.Tensor]:
    """The model's M float32 embeddings (one per learner) of a batch, run in the precision and memory format of --amp and
    --channels-last."""
    amp_dtype = AMP_DTYPES[args.amp]
    images = images.to(device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return [e.float() for e in model(images)]


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device, args: argparse.Namespace, scaler: torch.amp.GradScaler | None,
                    epoch: int, show_progress: bool) -> dict[str, Any]:
    """One pass over the training batches; returns the epoch's figures summed over processes.
    UserError when no batch held a readable image (before anything of the epoch is written).

    A batch whose loss used no anchor (no positive pair, or nothing mined) is not stepped. The counts
    and loss sums stay on the device and are read once at the end of the epoch; the one per-step
    read is the skip decision, copied to the host before the backward pass is queued and waited on
    after it, so the device never idles for it.
    """
    model.train()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    loss_sum, skipped, nonfinite, images = totals.unbind()  # views: adding to them fills `totals`
    unreadable: list[tuple[str, str]] = []
    started = time.perf_counter()
    batches = loader
    if show_progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
    for step, (x, labels, bad_files) in enumerate(batches):
        unreadable += bad_files
        if x.shape[0] == 0:  # every image of the batch was unreadable (under DDP the others would wait)
            continue
        embeddings = learner_embeddings(model, x, device, args)
        labels = labels.to(device, non_blocking=True)
        if args.gather_embeddings and dist.is_initialized():
            embeddings, labels = gather_with_grad(embeddings, labels)
        loss = criterion(embeddings, labels)
        # Every process must take the same decision, or the DDP replicas would drift apart.
        anchors = all_reduce_sum(criterion.stats["anchors"].detach().to(torch.float64))
        skip = anchors == 0
        skip_on_host = skip.to("cpu", non_blocking=True)
        skip_ready = torch.cuda.Event() if device.type == "cuda" else None
        if skip_ready is not None:
            skip_ready.record()
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if skip_ready is not None:
            skip_ready.synchronize()
        if not skip_on_host.item():
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        detached = loss.detach()
        loss_sum += detached
        skipped += skip
        nonfinite += ~torch.isfinite(detached)
        images += x.shape[0]
        if show_progress and step % PROGRESS_EVERY == 0:
            batches.set_postfix(loss=f"{detached.item():.4f}")
    totals = all_reduce_sum(totals).tolist()
    if totals[3] == 0:  # summed over processes, so that every process stops together
        raise UserError(no_readable_batch(args.data_dir, f"training batch of epoch {epoch + 1}", unreadable,
                                          "replace or remove the unreadable images"))
    steps = len(loader) * (dist.get_world_size() if dist.is_initialized() else 1)
    return {"train_loss": totals[0] / steps, "skipped_batches": int(totals[1]), "train_batches": steps,
            "nonfinite_batches": int(totals[2]), "images_per_s": totals[3] / (time.perf_counter() - started),
            "unreadable": unreadable}


@torch.no_grad()
def validate(model: nn.Module, criterion: nn.Module, loader: DataLoader, device: torch.device,
             args: argparse.Namespace) -> tuple[float, list[tuple[str, str]]]:
    """The validation loss: the mean loss over all validation batches of all processes (a skipped
    batch counts as 0, as a batch with nothing left to mine is one the loss has nothing against);
    also the unreadable files, as (path, reason). UserError when no batch held a readable image."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, batches
    unreadable: list[tuple[str, str]] = []
    for x, labels, bad_files in loader:
        unreadable += bad_files
        if x.shape[0] == 0:
            continue
        totals[0] += criterion(learner_embeddings(model, x, device, args), labels.to(device, non_blocking=True))
        totals[1] += 1
    loss_sum, batches = all_reduce_sum(totals).tolist()
    if batches == 0:  # a loss of 0 from no image would be saved as the best checkpoint
        raise UserError(no_readable_batch(args.data_dir, "validation batch", unreadable,
                                          "replace or remove the unreadable images, or raise --val-ratio"))
    return loss_sum / batches, unreadable


def no_readable_batch(data_dir: str, what: str, unreadable: Sequence[tuple[str, str]], remedy: str) -> str:
    """The one-line message for a pass in which no batch could be formed from readable images."""
    example = f", e.g. {unreadable[0][0]} ({unreadable[0][1]})" if unreadable else ""
    return (f"{data_dir}: no {what} could be formed: none of its {len(unreadable)} image(s) could be read"
            f"{example}; {remedy}")


# ----------------------------------------------------------------------------- resume
def describe_train_files(dataset: KimiaDataset, indices: Sequence[int], root: str) -> dict:
    """The count and a SHA-256 of the training files' paths (relative to --data-dir, in index order),
    so that --resume can tell other data from a moved folder."""
    digest = hashlib.sha256()
    for index in indices:
        digest.update(os.path.relpath(dataset.samples[index][0], root).encode() + b"\n")
    return {"count": len(indices), "sha256": digest.hexdigest()}


def load_resume_checkpoint(path: str, run: dict, args: argparse.Namespace) -> dict:
    """The checkpoint to resume from, refused (one line naming every difference) when its model, loss,
    classes, settings or training files are not this command's. `run` holds this command's
    model_name, loss_name, model_options, loss_options, class_names and train_files."""
    try:
        checkpoint = read_torch_file(path, label=f"--resume {path}")
    except CheckpointError as err:
        raise UserError(f"{err}; use the <run>_checkpoint.pth of an earlier run") from None
    if not is_training_checkpoint(checkpoint) or "optimizer" not in checkpoint:
        raise UserError(f"--resume {path}: not a checkpoint written by train.py")
    for key in ("model_name", "loss_name", "model_options", "class_names"):
        if checkpoint.get(key) != run[key]:
            raise UserError(f"--resume {path}: its {key} is {checkpoint.get(key)!r} but this run's is {run[key]!r}; "
                            "resume with the same model, loss, options and data")
    saved_args = checkpoint.get("args") or {}
    differences = [f"--{dest.replace('_', '-')} ({saved_args[dest]} in the checkpoint, {getattr(args, dest)} here)"
                   for dest in RESUME_SETTINGS if dest in saved_args and saved_args[dest] != getattr(args, dest)]
    differences += [f"loss option {key} ({value} in the checkpoint, {run['loss_options'].get(key)} here)"
                    for key, value in (checkpoint.get("loss_options") or {}).items() if run["loss_options"].get(key) != value]
    saved_trunk, trunk = checkpoint.get("trunk") or {}, run.get("trunk") or {}
    if saved_trunk.get("weights_sha256") != trunk.get("weights_sha256"):
        differences.append(f"the frozen trunk's weights ({saved_trunk.get('spec')} in the checkpoint, "
                           f"{trunk.get('spec')} here, or the same encoder with other weights)")
    saved_files = checkpoint.get("train_files")
    if saved_files and saved_files != run["train_files"]:
        differences.append(f"the training files ({saved_files['count']} in the checkpoint, "
                           f"{run['train_files']['count']} here, or the same number with other names)")
    if differences:
        raise UserError(f"--resume {path}: this command differs from the checkpoint's run in " + ", ".join(differences)
                        + "; resume with the checkpoint's settings (only --epochs may change)")
    return checkpoint


def step_lr_scheduler(lr_scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """StepLR.step() at the start of an epoch, before any optimizer.step(): the reference code's order,
    about which PyTorch >= 1.1 warns; the warning is the point of --lr-step-at start."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        lr_scheduler.step()


# ----------------------------------------------------------------------------- outputs
class RunFiles(NamedTuple):
    """The files a training run writes into its --output-dir, each named after the run's identity."""

    output_dir: Path
    identity: str

    @property
    def last_epoch(self) -> Path:
        """Rewritten every epoch, for --resume: <identity>_checkpoint.pth."""
        return Path(self.output_dir) / last_epoch_name(self.identity)

    @property
    def log(self) -> Path:
        return Path(self.output_dir) / f"{self.identity}_log.csv"

    @property
    def plot(self) -> Path:
        return Path(self.output_dir) / f"{self.identity}_loss.png"

    def best(self, val_loss: float) -> Path:
        return best_checkpoint_path(self.output_dir, self.identity, val_loss)

    def existing(self) -> list[Path]:
        """The files of a run of this identity already in the folder: the log, the plot, best-validation
        files by name, and the last-epoch file."""
        folder = Path(self.output_dir)
        if not folder.is_dir():
            return []
        found = [path for path in (self.log, self.plot) if path.exists()]
        found += sorted(path for path in folder.glob("*.pth")
                        if (match := LOSS_IN_NAME.match(path.name)) and match["run"] == self.identity)
        if self.last_epoch.exists():
            found.append(self.last_epoch)
        return found


def refuse_other_run(files: RunFiles) -> None:
    """UserError (one line) when the output folder already holds a run of the same identity, which a new
    run would overwrite (log, plot, last epoch) and mix with (its best-validation files would compete
    in the selection); --resume continues such a run instead."""
    found = files.existing()
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        resume = files.last_epoch if files.last_epoch in found else "<its last checkpoint>"
        raise UserError(f"{files.output_dir} already holds a {files.identity} run ({found[0].name}{more}), which this "
                        f"run would overwrite; pass --resume {resume} to continue it, or a new --output-dir")


def best_checkpoint_path(output_dir: str | os.PathLike, identity: str, val_loss: float) -> Path:
    """`<output-dir>/<identity>_<val_loss:.4f>.pth`: the reference's name for a best-validation file
    (`<model>_<loss>_...`) for a run without options."""
    return Path(output_dir) / f"{identity}_{val_loss:.4f}.pth"


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    """The training and validation loss per epoch, as a PNG."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker=".", label="training")
    ax.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- TensorBoard
PROJECTOR_IMAGES = 2000  # validation images shown in the embedding projector at most
PROJECTOR_THUMBNAIL = 48  # their thumbnails' side in pixels


class TensorBoardLog:
    """--tensorboard DIR: each epoch's figures as scalars, and at the end the validation embeddings
    with their thumbnails and classes for TensorBoard's embedding projector."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install -r requirements.txt") from None
        self.writer = SummaryWriter(log_dir)

    def epoch(self, row: dict) -> None:
        """One row of the run's history (train.py's log.csv), at step epoch + 1."""
        step = row["epoch"] + 1
        for tag, key in (("loss/train", "train_loss"), ("loss/validation", "val_loss"), ("learning_rate", "lr"),
                         ("images_per_second", "images_per_s"), ("skipped_batches", "skipped_batches")):
            self.writer.add_scalar(tag, row[key], step)
        self.writer.flush()

    def embeddings(self, model: nn.Module, dataset: KimiaDataset, val_indices: Sequence[int], args: argparse.Namespace,
                   preprocessing: Preprocessing, device: torch.device, steps: InputSteps | None = None) -> None:
        """The validation images' embeddings (the first PROJECTOR_IMAGES), as every tool embeds them
        (`steps`: the encoder's input steps; default the --crop-size centre crop)."""
        from histo_retrieval.evaluation.embedder import CropCache, Embedder

        indices = list(val_indices)[:PROJECTOR_IMAGES]
        paths = [dataset.samples[i][0] for i in indices]
        model.eval()
        embedder = Embedder(model, device, args.batch_size, args.amp, args.channels_last, preprocessing)
        with CropCache(paths, steps or args.crop_size, args.workers) as cache:
            if not len(cache):
                return
            vectors = embedder.embed(cache.batches(args.batch_size)).float().cpu()
            thumbnails = torch.cat([nn.functional.interpolate(batch.float().div(255), size=PROJECTOR_THUMBNAIL,
                                                              mode="area") for batch in cache.batches(args.batch_size)])
            classes = [dataset.classes[dataset.samples[indices[k]][1]] for k in cache.kept]
        self.writer.add_embedding(vectors, metadata=classes, label_img=thumbnails, global_step=args.epochs,
                                  tag="validation")

    def close(self) -> None:
        self.writer.close()
