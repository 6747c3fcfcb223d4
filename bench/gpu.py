"""The stages of bench/gpu.sh, one subcommand each, run as separate processes so that one stage's crash
(a CUDA error poisons its process) leaves the others' figures.

    python3 -m bench.gpu stacked-tail --device cuda --rows ROWS.json
    python3 -m bench.gpu train --device cuda --rows ROWS.json        # se_resnet50 + MSLoss, batch 60, 224 px
    python3 -m bench.gpu ddp --device cuda --work DIR --rows ROWS.json
    python3 -m bench.gpu tests --rows ROWS.json -- -m "not slow" tests
    python3 -m bench.gpu report --rows-dir DIR --out FILE --status train=0 ...

Every stage but `report` writes its rows (stage, case, images_per_s, peak_mib, seconds, result, ok) to
--rows as JSON after each row, prints them, and exits 1 if any row failed; `report` turns the rows of
all stages into one Markdown table with the device's name, torch's version and the date.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.gpu")

import torch
from torch import Tensor, nn

from bench.run_all import machine_description  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from losses import build_loss  # noqa: E402
from models import build_model  # noqa: E402
from models.layers import StackedBatchNorm2d  # noqa: E402
from models.reference import per_head_copy  # noqa: E402
from histo_retrieval.errors import UserError, run_script  # noqa: E402
from histo_retrieval.files import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stacked-tail", "train", "ddp", "tests")
# (precision, memory format) of the training bench: the reference's float32 NCHW first, then train.py's
# --channels-last with --amp off, bf16 and fp16.
TRAIN_CONFIGS = (("float32", "contiguous"), ("float32", "channels_last"), ("bf16", "channels_last"),
                 ("fp16", "channels_last"))
AMP = {"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Float32 with TF32 off: the stacked and per-head paths differ only in summation order and kernel choice.
EMBEDDING_ATOL = 1e-4
STATS_RTOL, STATS_ATOL = 1e-4, 1e-5
# The DDP run over gloo on CPU processes (the reduced form, or beside a single GPU): small and quick.
GLOO_CROP, GLOO_BATCH, GLOO_PROCESSES = 64, 4, 2
# The paper's batch: 60 images per step over all processes.
PAPER_BATCH = 60
MIN_TRAIN_BATCH = 4


class Rows:
    """A stage's rows, rewritten to `path` after each one so that a crash keeps those before it."""

    def __init__(self, path: str, stage: str) -> None:
        self.path, self.stage, self.rows = path, stage, []

    def add(self, case: str, ok: bool, result: str, images_per_s: float | None = None,
            peak_mib: float | None = None, seconds: float | None = None) -> None:
        row = {"stage": self.stage, "case": case, "images_per_s": images_per_s, "peak_mib": peak_mib,
               "seconds": seconds, "result": result, "ok": ok}
        self.rows.append(row)
        atomic_write_text(self.path, json.dumps(self.rows, indent=1) + "\n")
        print(format_row(row), flush=True)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row["ok"] for row in self.rows)


def device_from(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu for the "
                        "reduced form")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- stacked tail
def running_stats(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in model.state_dict().items() if ".running_" in key}


def stats_difference(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> tuple[float, bool]:
    """(max |difference|, whether every tensor is within STATS_RTOL / STATS_ATOL)."""
    if set(ours) != set(theirs):
        raise AssertionError(f"running statistics differ in keys: {sorted(set(ours) ^ set(theirs))[:4]}")
    worst, close = 0.0, True
    for key, value in ours.items():
        a, b = value.double(), theirs[key].double()
        worst = max(worst, (a - b).abs().max().item())
        close = close and torch.allclose(a, b, rtol=STATS_RTOL, atol=STATS_ATOL)
    return worst, close


def max_difference(ours: list[Tensor], theirs: list[Tensor]) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs))


def check_stacked_tail(name: str, memory_format: str, args: argparse.Namespace, device: torch.device
                       ) -> tuple[float, float, float, bool]:
    """(max |train embedding diff|, max |running-stat diff|, max |eval embedding diff|, all within tolerance)
    between the model's stacked tail and the per-head path, after one training-mode forward pass."""
    torch.manual_seed(args.seed)
    model = build_model(name)
    reference = per_head_copy(model)  # before any forward pass: both start from the same statistics
    images = torch.rand(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    images = images.contiguous(memory_format=MEMORY_FORMATS[memory_format])
    outputs: dict[str, dict[str, list[Tensor]]] = {}
    with torch.no_grad():
        for key, variant in (("ours", model), ("per-head", reference)):
            variant.to(device, memory_format=MEMORY_FORMATS[memory_format]).train()
            for module in variant.modules():  # ABE_M's dropout would draw other masks on CUDA
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.eval()
            outputs[key] = {"train": variant(images)}
            variant.eval()
            outputs[key]["eval"] = variant(images)
    synchronize(device)
    train_diff = max_difference(outputs["ours"]["train"], outputs["per-head"]["train"])
    eval_diff = max_difference(outputs["ours"]["eval"], outputs["per-head"]["eval"])
    stats_diff, stats_close = stats_difference(running_stats(model), running_stats(reference, "model."))
    ok = train_diff <= EMBEDDING_ATOL and eval_diff <= EMBEDDING_ATOL and stats_close
    return train_diff, stats_diff, eval_diff, ok


def check_stacked_batchnorm(device: torch.device, seed: int) -> tuple[float, bool]:
    """StackedBatchNorm2d(stacks=4) against one nn.BatchNorm2d call per sub-batch: outputs, input and
    parameter gradients and running statistics; (max |difference|, within tolerance)."""
    torch.manual_seed(seed)
    stacked = StackedBatchNorm2d(256, stacks=4).to(device)
    nn.init.uniform_(stacked.weight)
    nn.init.uniform_(stacked.bias)
    separate = nn.BatchNorm2d(256).to(device)
    separate.load_state_dict(stacked.state_dict())
    # Sub-batches with their own mean and spread, so that pooled statistics would show.
    scale = torch.arange(1, 5, device=device).repeat_interleave(8).view(-1, 1, 1, 1)
    x = torch.randn(32, 256, 14, 14, device=device) * scale + scale
    grad = torch.randn_like(x)
    results = []
    for norm, forward in ((stacked, stacked), (separate, lambda t: torch.cat([separate(c) for c in t.chunk(4)]))):
        x_copy = x.clone().requires_grad_()
        out = forward(x_copy)
        out.backward(grad)
        results.append([out, x_copy.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var])
    worst = max_difference(results[0], results[1])
    close = all(torch.allclose(a, b, rtol=STATS_RTOL, atol=STATS_ATOL) for a, b in zip(*results))
    return worst, close


def stacked_tail_main(args: argparse.Namespace) -> bool:
    device = device_from(args.device)
    # IEEE float32 everywhere, so that the two paths' differences are rounding, not TF32's 10-bit mantissa.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = Rows(args.rows, "stacked-tail")
    started = time.perf_counter()
    worst, ok = check_stacked_batchnorm(device, args.seed)
    rows.add(f"StackedBatchNorm2d(256, stacks=4) vs 4 BatchNorm2d calls, {device.type}, float32", ok,
             f"{'ok' if ok else 'FAIL'}: max |diff| {worst:.1e} (outputs, gradients, running stats)",
             seconds=time.perf_counter() - started)
    precision_note = " (TF32 off)" if device.type == "cuda" else ""
    for name in args.models:
        for memory_format in ("contiguous", "channels_last"):
            started = time.perf_counter()
            train_diff, stats_diff, eval_diff, ok = check_stacked_tail(name, memory_format, args, device)
            rows.add(f"{name} stacked tail vs per-head, {device.type}, float32{precision_note}, {memory_format}, "
                     f"batch {args.batch_size}, {args.crop_size}px", ok,
                     f"{'ok' if ok else 'FAIL'}: max |diff| train {train_diff:.1e}, eval {eval_diff:.1e} "
                     f"(<= {EMBEDDING_ATOL:g}); running stats {stats_diff:.1e}",
                     seconds=time.perf_counter() - started)
            free_memory(device)
    return rows.ok


# ----------------------------------------------------------------------------- training steps
def bench_labels(batch_size: int, device: torch.device) -> Tensor:
    """Kimia Path24's 24 classes dealt round-robin (fewer for a small batch, so that every class has a pair
    and MSLoss both positives and negatives), shuffled as a random batch would be."""
    if batch_size < MIN_TRAIN_BATCH:
        raise UserError(f"--batch-size must be at least {MIN_TRAIN_BATCH} (2 classes of 2 images, so that MSLoss "
                        f"has positive and negative pairs), got {batch_size}")
    classes = min(24, batch_size // 2)
    generator = torch.Generator().manual_seed(0)
    return (torch.arange(batch_size) % classes)[torch.randperm(batch_size, generator=generator)].to(device)


def time_training(precision: str, memory_format: str, args: argparse.Namespace, device: torch.device
                  ) -> tuple[float, float | None, float]:
    """(images per second, peak MiB allocated over the timed steps or None on CPU, last loss) of
    se_resnet50 + MSLoss + SGD steps as train.py takes them."""
    torch.manual_seed(args.seed)
    layout = MEMORY_FORMATS[memory_format]
    model = build_model("se_resnet50").to(device, memory_format=layout).train()
    criterion = build_loss("MSLoss").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)  # the reference's
    amp_dtype = AMP[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    images = torch.rand(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    images = images.contiguous(memory_format=layout)
    labels = bench_labels(args.batch_size, device)
    losses: list[Tensor] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            embeddings = [e.float() for e in model(images)]
        loss = criterion(embeddings, labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(loss.detach())

    for _ in range(args.warmup):  # cuDNN's algorithm search and the allocator's first blocks happen here
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device, args.steps, warmup=0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    last = torch.stack(losses).float()
    if not torch.isfinite(last).all():
        raise FloatingPointError(f"non-finite loss in {int((~torch.isfinite(last)).sum())} of {len(losses)} steps")
    return args.batch_size / seconds, peak, last[-1].item()


def train_main(args: argparse.Namespace) -> bool:
    device = device_from(args.device)
    torch.backends.cudnn.benchmark = True  # as train.py sets it on CUDA
    rows = Rows(args.rows, "train")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    bench_labels(args.batch_size, device)  # a batch too small for MSLoss fails here, not in every row
    baseline = None
    for precision, memory_format in TRAIN_CONFIGS:
        if precision not in args.precisions:
            continue
        case = (f"se_resnet50 + MSLoss train step, {where}, {precision}, {memory_format}, batch {args.batch_size}, "
                f"{args.crop_size}px, median of {args.steps} after {args.warmup} warm-up")
        started = time.perf_counter()
        try:
            speed, peak, loss = time_training(precision, memory_format, args, device)
        except torch.cuda.OutOfMemoryError:
            rows.add(case, False, "out of memory", seconds=time.perf_counter() - started)
        except (RuntimeError, FloatingPointError) as err:  # an unsupported kernel, a non-finite loss
            rows.add(case, False, f"FAIL: {str(err).splitlines()[0][:160]}", seconds=time.perf_counter() - started)
        else:
            baseline = baseline or speed
            rows.add(case, True, f"ok: last loss {loss:.4f}, {speed / baseline:.2f}x the first row's images/s",
                     speed, peak, time.perf_counter() - started)
        free_memory(device)
    return rows.ok


# ----------------------------------------------------------------------------- train.py under torchrun
def make_images(root: Path, classes: int, per_class: int, patch_size: int) -> Path:
    """A small synthetic Kimia-like training folder (class folders of JPEGs) from KIMIA_data/synthetic.py."""
    from KIMIA_data.synthetic import make_rgb_release

    make_rgb_release(root, num_classes=classes, patch_size=patch_size, train_per_class=per_class,
                     test_per_class=1, workers=min(os.cpu_count() or 1, classes))
    return root / "Training"


def train_py_run(label: str, device: str, processes: int, batch_size: int, crop_size: int, extra: list[str],
                 args: argparse.Namespace, rows: Rows) -> None:
    """Two epochs of train.py se_resnet50 MSLoss under torchrun; its second epoch's images/s (the first
    includes cuDNN's search and the loader's start) and a check of what it wrote."""
    work = Path(args.work) / label
    # 2 training steps per process and epoch after the 25% validation split, 8 classes.
    per_class = math.ceil(2 * batch_size * processes / 0.75 / 8) + 1
    data = make_images(work / "data", 8, per_class, crop_size + 16)
    out = work / "model"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "train.py"), "se_resnet50", "MSLoss", "--data-dir", str(data), "--output-dir", str(out),
               "--epochs", "2", "--batch-size", str(batch_size), "--crop-size", str(crop_size),
               "--val-ratio", "0.25", "--workers", str(args.workers), "--device", device, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    backend = "NCCL" if device == "cuda" and processes > 1 else "gloo" if processes > 1 else "no DDP, one process"
    case = (f"torchrun --nproc_per_node={processes} train.py se_resnet50 MSLoss {' '.join(extra)} on {device} "
            f"({backend}), batch {batch_size} x {processes}, {crop_size}px, epoch 2 of 2").replace("  ", " ")
    print(shlex.join(command), flush=True)
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rows.add(case, False, f"FAIL: timed out after {args.timeout} s", seconds=time.perf_counter() - started)
        return
    seconds = time.perf_counter() - started
    sys.stdout.write(result.stdout[-4000:])
    sys.stderr.write(result.stderr[-4000:])
    log = out / "se_resnet50_MSLoss_log.csv"
    problems = []
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        problems.append(f"exit status {result.returncode} ({last[:160]})")
    elif result.stdout.count("epoch 2/2") != 1:
        problems.append("rank 0 did not print epoch 2/2 exactly once")
    if not result.returncode and not (out / "se_resnet50_MSLoss_checkpoint.pth").exists():
        problems.append("no se_resnet50_MSLoss_checkpoint.pth")
    speed, loss, steps = None, math.nan, 0
    if log.exists():
        with open(log, newline="") as f:
            last_epoch = list(csv.DictReader(f))[-1]
        speed, loss = float(last_epoch["images_per_s"]), float(last_epoch["train_loss"])
        steps = int(last_epoch["train_batches"])
        if not math.isfinite(loss):
            problems.append(f"training loss {loss}")
        if steps < processes or steps % processes:  # each process takes the same number of steps
            problems.append(f"{steps} steps in all for {processes} processes")
    elif not result.returncode:
        problems.append(f"no {log.name}")
    result_text = f"FAIL: {'; '.join(problems)}" if problems else f"ok: {steps} steps in all, training loss {loss:.4f}"
    rows.add(case, not problems, result_text, speed, seconds=seconds)


def ddp_main(args: argparse.Namespace) -> bool:
    device = device_from(args.device)
    rows = Rows(args.rows, "ddp")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        train_py_run("cuda", "cuda", gpus, max(2, PAPER_BATCH // gpus), args.crop_size,
                     ["--amp", args.amp, "--channels-last"], args, rows)
    if device.type == "cpu" or torch.cuda.device_count() < 2:
        # NCCL refuses two processes on one GPU: with a single GPU, DDP runs over gloo on CPU processes.
        train_py_run("gloo", "cpu", GLOO_PROCESSES, GLOO_BATCH, GLOO_CROP, [], args, rows)
    return rows.ok


# ----------------------------------------------------------------------------- the test suite
def junit_counts(path: Path) -> dict[str, int]:
    """Counts of a pytest junit XML file: tests, failures, errors, skipped, and tests run on CUDA."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    # A `device` test's id carries its device among its parameters: test_x[cuda], test_x[2-cuda-...].
    cuda = re.compile(r"\[(.*-)?cuda(:\d+)?(-.*)?\]$")
    counts["cuda"] = sum(bool(cuda.search(case.get("name", ""))) for case in suite.iter("testcase"))
    return counts


def tests_main(args: argparse.Namespace) -> bool:
    device = device_from(args.device)
    rows = Rows(args.rows, "tests")
    junit = Path(args.rows).with_suffix(".junit.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *args.pytest_args]
    case = shlex.join(["pytest", *args.pytest_args])
    print(shlex.join(command), flush=True)
    started = time.perf_counter()
    try:
        returncode = subprocess.run(command, cwd=REPO, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        rows.add(case, False, f"FAIL: timed out after {args.timeout} s", seconds=time.perf_counter() - started)
        return False
    seconds = time.perf_counter() - started
    if not junit.exists():
        rows.add(case, False, f"FAIL: exit status {returncode}, no report", seconds=seconds)
        return False
    counts = junit_counts(junit)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    # On CUDA the point is the device tests' CUDA side: a run without one is a failure too.
    ok = returncode == 0 and counts["tests"] > 0 and (device.type == "cpu" or counts["cuda"] > 0)
    rows.add(case, ok, f"{'ok' if ok else 'FAIL'}: {passed} passed ({counts['cuda']} on CUDA), "
             f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped", seconds=seconds)
    return ok


# ----------------------------------------------------------------------------- the table
def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_row(row: dict[str, Any]) -> str:
    return (f"| {row['stage']} | {row['case']} | {_figure(row['images_per_s'], 1)} | {_figure(row['peak_mib'], 0)} "
            f"| {_figure(row['seconds'], 1)} | {row['result']} |")


def device_title(device: torch.device) -> str:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        return torch.cuda.get_device_name(0) + (f" x {count}" if count > 1 else "")
    return "CPU (reduced form)"


def report_main(args: argparse.Namespace) -> bool:
    device = device_from(args.device)
    if any("=" not in item for item in args.status):
        raise UserError(f"--status {' '.join(args.status)}: expected STAGE=EXIT_STATUS items")
    status = dict(item.split("=", 1) for item in args.status)
    rows: list[dict[str, Any]] = []
    for stage in STAGES:
        if stage not in status:
            continue
        path = Path(args.rows_dir) / f"{stage}.json"
        stage_rows = json.loads(path.read_text()) if path.exists() else []
        rows += stage_rows
        if status[stage] != "0" and all(row["ok"] for row in stage_rows):
            rows.append({"stage": stage, "case": "the stage's process", "images_per_s": None, "peak_mib": None,
                         "seconds": None, "result": f"FAIL: exit status {status[stage]} (its log is printed above)",
                         "ok": False})
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    passed = sum(row["ok"] for row in rows)
    lines = [f"GPU bench on {device_title(device)}, {versions}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"Machine: {machine_description()}", "", f"Command: `{args.command}`", "",
             f"{passed} of {len(rows)} rows ok. Train and ddp rows: torch's TF32 defaults (cuDNN "
             f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}); stacked-tail "
             "rows: TF32 off. Peak memory: torch.cuda.max_memory_allocated over the timed steps.", "",
             "| stage | case | images/s | peak MiB | s | result |", "| --- | --- | ---: | ---: | ---: | --- |"]
    lines += [format_row(row) for row in rows]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return bool(rows) and passed == len(rows)


# ----------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_text: str, rows: bool = True) -> argparse.ArgumentParser:
        sub = stages.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
        if rows:
            sub.add_argument("--rows", required=True, help="JSON file for this stage's rows (required)")
        return sub

    tail = stage("stacked-tail", "stacked tail and StackedBatchNorm2d against the per-head path, float32")
    tail.add_argument("--models", nargs="+", default=["resnet50", "ABE_M"],
                      help="models with M > 1 heads (default: resnet50 ABE_M)")
    tail.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    tail.add_argument("--crop-size", type=int, default=224, help="image side (default: 224)")
    tail.add_argument("--seed", type=int, default=0, help="seed of weights and images (default: 0)")

    train = stage("train", "images/s and peak memory of se_resnet50 + MSLoss training steps on random images")
    train.add_argument("--batch-size", type=int, default=PAPER_BATCH, help=f"images per step (default: {PAPER_BATCH})")
    train.add_argument("--crop-size", type=int, default=224, help="image side (default: 224)")
    train.add_argument("--steps", type=int, default=20, help="timed steps, median used (default: 20)")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    train.add_argument("--precisions", nargs="+", choices=tuple(AMP), default=list(AMP),
                       help="float32 (contiguous and channels_last), bf16 or fp16 autocast (channels_last); fp16 "
                            "with torch.amp.GradScaler (default: float32 bf16 fp16)")
    train.add_argument("--seed", type=int, default=0, help="seed of weights and images (default: 0)")

    ddp = stage("ddp", "train.py under torchrun: NCCL over the GPUs present, gloo over 2 CPU processes")
    ddp.add_argument("--work", required=True, help="folder for the synthetic data and the runs' outputs (required)")
    ddp.add_argument("--crop-size", type=int, default=224, help="crop of the CUDA run (default: 224)")
    ddp.add_argument("--amp", choices=("off", "bf16", "fp16"), default="fp16",
                     help="train.py --amp of the CUDA run, which also takes --channels-last (default: fp16)")
    ddp.add_argument("--workers", type=int, default=2, help="train.py --workers (default: 2)")
    ddp.add_argument("--timeout", type=int, default=300, help="seconds per train.py run (default: 300)")

    tests = stage("tests", "the test suite; the tests that take `device` run on CUDA too where present (with "
                           "--device cuda, a run where none did fails)")
    tests.add_argument("--timeout", type=int, default=360, help="seconds for the whole run (default: 360)")
    tests.add_argument("pytest_args", nargs="*", help="pytest's arguments, after -- (default: none)")

    report = stage("report", "one Markdown table of every stage's rows", rows=False)
    report.add_argument("--rows-dir", required=True, help="folder of the stages' <stage>.json files (required)")
    report.add_argument("--out", required=True, help="Markdown file to write (required)")
    report.add_argument("--status", nargs="*", default=[], metavar="STAGE=RC",
                        help="exit status of each stage that ran (default: none)")
    report.add_argument("--command", default="bash bench/gpu.sh", help="command shown in the table "
                        "(default: bash bench/gpu.sh)")
    return parser


MAINS: dict[str, Callable[[argparse.Namespace], bool]] = {
    "stacked-tail": stacked_tail_main, "train": train_main, "ddp": ddp_main, "tests": tests_main,
    "report": report_main}


def main(args: argparse.Namespace) -> int:
    """Run one stage; 1 when it failed (its rows say why)."""
    for key in ("batch_size", "crop_size", "steps"):
        if getattr(args, key, 1) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    return 0 if MAINS[args.stage](args) else 1


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
