"""Train a deep-metric-learning model on Kimia Path24 (the paper's recipe by default).

    python3 train.py se_resnet50 MSLoss                          # the paper's model and loss, reference settings
    python3 train.py ABE_M ABELoss --amp bf16 --channels-last    # faster on a recent GPU
    python3 train.py se_resnet50 MSLoss --no-attention           # the paper's ablation: se_resnet50-noattention_MSLoss_*
    python3 train.py se_resnet50 MSLoss --resume model/se_resnet50_MSLoss_checkpoint.pth
    torchrun --nproc_per_node=4 train.py se_resnet50 MSLoss --batch-size 15   # 4 GPUs, 60 images per step
    python3 train.py se_resnet50 MSLoss --pretrained imagenet --augment stain   # one's own tissue (docs/own_tissue.md)
    python3 train.py uni MSLoss --freeze-trunk --encoder-weights uni.bin   # a projection head on a frozen encoder

Every file is named after the run's identity, `<model>_<loss>` with a tag for each model or loss option
that differs from its default (`se_resnet50_MSLoss` for the paper's run, `se_resnet50-noattention_MSLoss`
for its ablation; `histo_retrieval.evaluation.checkpoint.run_identity`). Every epoch writes the last-epoch checkpoint (for
--resume: `<output-dir>/<identity>_checkpoint.pth`) and, when
the validation loss improves, `<output-dir>/<identity>_<val_loss:.4f>.pth` (a bare state_dict with
--save-bare-state-dict, as the reference writes it); otherwise both are dicts holding the model
state_dict in the reference layout with everything needed to resume or evaluate it (see
`histo_retrieval.evaluation.checkpoint.training_checkpoint`). The per-epoch figures go to `<output-dir>/<identity>_log.csv`
and a loss-curve PNG beside it. A new run refuses a folder that already holds a run of its identity
(pass --resume to continue that run, or another --output-dir). Images that cannot be decoded are left
out of their batches and listed at the end; the exit status is then 1; when no batch can be formed
from readable images, the run stops before writing anything of that epoch.

With --freeze-trunk the first argument is an encoder (timm:<architecture>, a preset, histogram or a
checkpoint file; histo_retrieval.encoders) and only a projection head learns, on the encoder's vectors:
computed once and cached when nothing augments the images (--augment none, the default then). The run
is `<trunk>-frozen-<head>_<loss>`, and its checkpoint loads like any other
(`histo_retrieval.training.frozen`, `histo_retrieval.encoders.frozen`).

Under torchrun the script runs DistributedDataParallel (NCCL on GPUs, gloo on CPU); --batch-size and
--workers are per process, and only rank 0 prints and writes files. The pieces live in
`histo_retrieval.training.loop` (data, one epoch, validation, resume) and `histo_retrieval.distributed`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import losses
import models
from histo_retrieval.evaluation.checkpoint import save_torch_file, training_checkpoint
from histo_retrieval.distributed import all_gather_lists, run_distributed_script, setup_distributed
from histo_retrieval.errors import UserError
from histo_retrieval.files import command_line, write_csv
from histo_retrieval.images import report_unreadable
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.runtime import check_runtime, seed_everything
from histo_retrieval.training.frozen import FrozenTrunk, add_frozen_arguments, check_frozen_arguments, frozen_names
from histo_retrieval.training.loop import (RunFiles, TensorBoardLog, add_training_arguments, build_datasets, build_loaders,
                           build_training_model, check_training_arguments, describe_train_files,
                           load_resume_checkpoint, plot_losses, refuse_other_run, resolve_augment, resolve_names,
                           seed_epoch, start_model, step_lr_scheduler, train_one_epoch, validate)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a deep-metric-learning model on Kimia Path24", add_help=add_help)
    parser.add_argument("model", help=f"one of {', '.join(models.MODEL_NAMES)} (case-insensitive; se_resnet accepted); "
                                      "with --freeze-trunk an encoder spec")
    parser.add_argument("loss", help=f"one of {', '.join(losses.LOSS_NAMES)} (case-insensitive; MsLoss accepted)")
    return add_frozen_arguments(add_training_arguments(parser))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns {best_checkpoint, best_val_loss, history, output_dir, num_images, unreadable, ...}.

    Raises UserError for bad arguments or data before any training starts, and when the loss
    becomes non-finite (the last good checkpoints are kept).
    """
    frozen = getattr(args, "freeze_trunk", False)  # train_traindata.py's commands have no such flag
    check_frozen_arguments(args, frozen)
    resolve_augment(args)
    names = frozen_names(args) if frozen else resolve_names(args)
    model_name, loss_name, requested_model_options, loss_options = names
    if args.summary:
        if frozen:
            trunk = FrozenTrunk(args, torch.device("cpu"))
            print(f"trunk (frozen): {trunk.encoder.describe()}")
            print(models.summary(trunk.whole(trunk.build_head()[0]), trunk.encoder.crop_size))
        else:
            model, _ = build_training_model(model_name, requested_model_options)
            print(models.summary(model, args.crop_size))
        return {}
    check_training_arguments(args)
    files = RunFiles(Path(args.output_dir), names.identity)
    if not args.resume:
        refuse_other_run(files)
    device, rank, world_size = setup_distributed(check_runtime(args, training=True))
    is_main = rank == 0
    trunk = None
    if frozen:
        if world_size > 1:
            raise UserError("--freeze-trunk runs in one process (an epoch of the head takes seconds); run it without "
                            "torchrun")
        trunk = FrozenTrunk(args, device)
        trunk.take_crop_size()
    dataset, train_indices, val_indices, num_images = build_datasets(args, check_crop=trunk is None or
                                                                     trunk.needs_crop_check)

    seed_everything(args.seed)
    if trunk is not None:
        model, model_options = trunk.build_head()
    else:
        model, model_options = build_training_model(model_name, requested_model_options)
    criterion = losses.build_loss(loss_name, **loss_options).to(device)
    run = {"model_name": model_name, "loss_name": loss_name, "model_options": model_options,
           "loss_options": loss_options, "class_names": list(dataset.classes), "history": [],
           "best_val_loss": math.inf, "command": command_line(),
           "train_files": describe_train_files(dataset, train_indices, args.data_dir)}
    if trunk is not None:
        run["trunk"] = trunk.record
    checkpoint = load_resume_checkpoint(args.resume, run, args) if args.resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        preprocessing = Preprocessing.from_dict(checkpoint.get("preprocessing"))
        run["pretrained"] = checkpoint.get("pretrained")
    elif trunk is not None:
        preprocessing, run["pretrained"] = trunk.encoder.preprocessing, None
    else:
        preprocessing, run["pretrained"] = start_model(model, model_name, args, verbose=is_main)
    run["preprocessing"] = preprocessing.to_dict()
    if trunk is not None:
        train_loader, val_loader = trunk.loaders(dataset, train_indices, val_indices, device, is_main)
    else:
        train_loader, val_loader = build_loaders(args, dataset, train_indices, val_indices, device, rank, world_size,
                                                 preprocessing)
    model.to(device)
    if args.channels_last and trunk is None:
        model.to(memory_format=torch.channels_last)
    # What each step runs: the model; with --freeze-trunk the head, on the cached vectors or after the trunk.
    run_model = model if trunk is None or trunk.cached else trunk.whole(model)
    step_args = args if trunk is None else trunk.step_args()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    start_epoch, best_path = 0, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if scaler is not None and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
        run["history"], run["best_val_loss"] = list(checkpoint["history"]), checkpoint["best_val_loss"]
        best_path = next((str(files.best(h["val_loss"])) for h in reversed(run["history"])
                          if h["val_loss"] == run["best_val_loss"]), None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_model = run_model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        print(f"{files.identity}: {len(train_indices)} training / {len(val_indices)} validation images of "
              f"{len(dataset.classes)} classes, {len(train_loader)} steps of {args.batch_size} x {world_size} "
              f"process(es) per epoch, on {device}" + (f", resuming at epoch {start_epoch + 1}" if start_epoch else ""),
              flush=True)
        if not preprocessing.is_reference:
            print(f"input preprocessing: {preprocessing.describe()}", flush=True)
        if start_epoch >= args.epochs:
            print(f"{args.resume} already holds epoch {start_epoch} of {args.epochs}; raise --epochs to train on")
    board = TensorBoardLog(args.tensorboard) if is_main and args.tensorboard else None
    unreadable: set[tuple[str, str]] = set()
    saved_best = [best_path] if best_path else []  # best checkpoints of this run, oldest first (--keep-best)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(train_loader, val_loader, args.seed, epoch, rank, world_size)
        if args.lr_step_at == "start":
            step_lr_scheduler(lr_scheduler)
        lr = optimizer.param_groups[0]["lr"]
        show_progress = is_main and sys.stderr.isatty()
        stats = train_one_epoch(train_model, criterion, optimizer, train_loader, device, step_args, scaler, epoch,
                                show_progress)
        val_loss, val_unreadable = validate(run_model, criterion, val_loader, device, step_args)
        if args.lr_step_at == "end":
            lr_scheduler.step()
        unreadable.update(stats.pop("unreadable"), val_unreadable)
        if stats["nonfinite_batches"] or not math.isfinite(val_loss):
            last = f"; the last good checkpoint is {files.last_epoch}" if epoch > start_epoch or args.resume else ""
            raise UserError(f"epoch {epoch + 1}: the loss became non-finite ({stats['nonfinite_batches']} training "
                            f"batches, validation loss {val_loss}){last}; lower --lr, or use --amp off")
        run["history"].append({"epoch": epoch, "train_loss": stats["train_loss"], "val_loss": val_loss, "lr": lr,
                               "images_per_s": stats["images_per_s"], "skipped_batches": stats["skipped_batches"],
                               "train_batches": stats["train_batches"]})
        improved = val_loss < run["best_val_loss"]
        if improved:
            run["best_val_loss"] = val_loss
        if is_main:
            state = training_checkpoint(model, optimizer, lr_scheduler, scaler, epoch, vars(args), run)
            if improved:
                best_path = str(files.best(val_loss))
                save_torch_file(state["model"] if args.save_bare_state_dict else state, best_path)
                saved_best = [p for p in saved_best if p != best_path] + [best_path]
                if args.keep_best:
                    for older in saved_best[:-args.keep_best]:
                        Path(older).unlink(missing_ok=True)
                    saved_best = saved_best[-args.keep_best:]
            save_torch_file(state, files.last_epoch)
            # Rewritten from the history every epoch, not appended to, so that after a resume the log
            # holds exactly the checkpoint's epochs.
            write_csv(run["history"], files.log)
            plot_losses(run["history"], files.plot, f"{model_name} + {loss_name}" + (
                f" ({files.identity})" if files.identity != f"{model_name}_{loss_name}" else ""))
            if board is not None:
                board.epoch(run["history"][-1])
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {stats['train_loss']:.4f}  val loss {val_loss:.4f}  "
                  f"lr {lr:.3g}  {stats['images_per_s']:.1f} img/s  skipped {stats['skipped_batches']}/"
                  f"{stats['train_batches']}" + (f"  saved {best_path}" if improved else ""), flush=True)
    if board is not None:
        if trunk is not None:
            board.embeddings(trunk.whole(model), dataset, val_indices, args, preprocessing, device,
                             trunk.encoder.input_steps)
        else:
            board.embeddings(model, dataset, val_indices, args, preprocessing, device)
        board.close()
        print(f"TensorBoard log in {args.tensorboard}: tensorboard --logdir {args.tensorboard}")
    # Each process reads its own share of the images: every process returns (and rank 0 reports) them all.
    unreadable_files = sorted(set(all_gather_lists(sorted(unreadable))))
    if is_main:
        report_unreadable(unreadable_files)
        if note := preprocessing.passed_through_note():
            print(note)
    return {"best_checkpoint": best_path, "last_checkpoint": str(files.last_epoch), "best_val_loss": run["best_val_loss"], "history": run["history"],
            "output_dir": str(files.output_dir), "device": str(device), "num_images": num_images, "num_train_images": len(train_indices),
            "num_val_images": len(val_indices), "class_names": run["class_names"], "unreadable": unreadable_files}


def command(args: argparse.Namespace) -> int:
    """The command line's main: exit status 1 when some images could not be read (main lists them)."""
    return 1 if main(args).get("unreadable") else 0


if __name__ == "__main__":
    sys.exit(run_distributed_script(command, get_args_parser().parse_args()))
