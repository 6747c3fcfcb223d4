"""Patches per second of each encoder family on this machine, and indexing with a timm encoder against
its model-bound rate.

    python3 -m bench.encoder_speed                                   # every family, float32 and bf16, 5 s each
    python3 -m bench.encoder_speed --encoders vit_s se_resnet50 --seconds 2 --out encoder_speed.json
    python3 -m bench.encoder_speed --encoders vit_s --index-encoder none      # no indexing figure

Families, each at its own input size (docs/encoders.md): the paper's three CNNs (models.build_model with
default options, randomly initialised, the reference's 224 px centre crop) and timm's ViT-S/16, ViT-B/16
and ViT-L/16 (`timm:vit_*_patch16_224 --encoder-weights random`, timm's eval transform: 224 px). The
pathology presets are ViT-L (UNI) or larger, so ViT-L/16 stands for their cost.

Model-bound rate: histo_retrieval.evaluation.embedder.Embedder (the tools' embedding step: uint8 to
[0, 1], mean and std, the model, L2 normalisation) over random uint8 crops of the encoder's input size,
one --batch-size batch per call, after one untimed batch, for at least --seconds (at least one timed
batch). Precisions: float32, and bf16 autocast (--amp bf16) where oneDNN finds the CPU's own bfloat16
instructions (histo_retrieval.runtime.cpu_runs_natively); elsewhere the row says "not native" and is
not measured (emulated bfloat16 is several times slower than float32).

Indexing: a folder of --index-patches generated patch images (PNG, --patch-size px) embedded by
histo_retrieval.search.indexing.embed_sources (the reading, DataLoader and chunking that `retrieve.py
index` runs for a folder source) with --index-workers reader processes, against the same encoder's
model-bound rate over as many random crops in the same batches, measured just before. Set-up (model
build, images written) is not timed.

The results (and the command, the machine and the settings) go to --out: JSON, or CSV when the name
ends in .csv. Other programs sharing the cores lower every figure; the "other cores" column says how
busy the rest of the machine was during each measurement (from /proc/stat).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run by path: the repository root, whose packages it imports, is not importable
    sys.exit("error: run it as a module, from the repository root: python3 -m bench.encoder_speed")

import numpy as np
import torch

from bench.timing import Meter
from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.errors import UserError, run_script
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.files import atomic_write_text, command_line
from histo_retrieval.runtime import cpu_name, cpu_runs_natively

# Family name -> (kind, what builds it): the paper's CNNs by models.build_model, ViTs by the encoder registry.
FAMILIES = {
    "se_resnet50": ("paper", "se_resnet50"),
    "ABE_M": ("paper", "ABE_M"),
    "resnet50": ("paper", "resnet50"),
    "vit_s": ("timm", "timm:vit_small_patch16_224"),
    "vit_b": ("timm", "timm:vit_base_patch16_224"),
    "vit_l": ("timm", "timm:vit_large_patch16_224"),
}
PAPER_CROP = 224
PRECISIONS = ("float32", "bf16")
COLUMNS = ("case", "encoder", "spec", "input", "dim", "precision", "batch_size", "patches", "seconds",
           "patches_per_s", "model_bound_patches_per_s", "fraction", "other_cores", "note")


@dataclass
class Built:
    """What the benchmark needs of an encoder: its model, input steps, normalisation and description."""
    name: str
    spec: str
    model: torch.nn.Module
    steps: InputSteps
    preprocessing: Preprocessing
    dim: int


def build(name: str, seed: int) -> Built:
    kind, spec = FAMILIES[name]
    if kind == "paper":
        import models

        torch.manual_seed(seed)
        model = models.build_model(spec).eval()
        dim = int(models.default_model_options(spec)["embedding_dim"])
        return Built(name, f"models.build_model({spec!r}), random", model, InputSteps(PAPER_CROP), Preprocessing(),
                     dim)
    from histo_retrieval.encoders import load_encoder

    encoder = load_encoder(spec, weights="random")  # timm's initialisation, seeded by the registry
    return Built(name, f"{spec} --encoder-weights random", encoder.model, encoder.input_steps,
                 encoder.preprocessing, encoder.dim)


# ----------------------------------------------------------------------------- measuring
def random_crops(steps: InputSteps, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, steps.crop_size, steps.crop_size), dtype=torch.uint8, generator=generator)


def model_bound(embedder: Embedder, batch: torch.Tensor, seconds: float) -> tuple[int, Meter]:
    """Patches embedded and the meter of a run of whole batches lasting at least `seconds` (one batch at least)."""
    embedder.embed(batch)  # untimed: oneDNN's primitives, the allocator
    patches = 0
    with Meter() as meter:
        started = time.perf_counter()
        while patches == 0 or time.perf_counter() - started < seconds:
            embedder.embed(batch)
            patches += len(batch)
    return patches, meter


def row(case: str, built: Built, precision: str, batch_size: int, patches: int = 0, meter: Meter | None = None,
        note: str = "", **extra) -> dict:
    rate = patches / meter.wall if meter else None
    return {"case": case, "encoder": built.name, "spec": built.spec, "input": built.steps.describe(), "dim": built.dim,
            "precision": precision, "batch_size": batch_size, "patches": patches,
            "seconds": round(meter.wall, 3) if meter else None, "patches_per_s": round(rate, 2) if rate else None,
            "model_bound_patches_per_s": None, "fraction": None,
            "other_cores": round(meter.other_cores, 2) if meter else None, "note": note, **extra}


# ----------------------------------------------------------------------------- indexing a folder
def write_patches(folder: Path, count: int, size: int, seed: int) -> list[str]:
    """`count` PNG patches of `size` px: smooth colour fields with fine noise, which compress and decode
    like stained tissue rather than like white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(40, 230, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"c{i % 3}" / f"patch_{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def index_rows(built: Built, args: argparse.Namespace, precision: str) -> list[dict]:
    """embed_sources over a folder of patch images against the model-bound rate over as many random crops."""
    from histo_retrieval.search.indexing import embed_sources, source_jobs
    from histo_retrieval.search.slides import Tiling

    amp = "bf16" if precision == "bf16" else "off"
    embedder = Embedder(built.model, "cpu", args.batch_size, amp, preprocessing=built.preprocessing)
    with tempfile.TemporaryDirectory(prefix="encoder_speed_") as temp:
        write_patches(Path(temp), args.index_patches, args.patch_size, args.seed)
        jobs, missing = source_jobs([temp])
        if missing or len(jobs[0].files) != args.index_patches:
            raise RuntimeError(f"the generated folder holds {len(jobs[0].files)} images, expected {args.index_patches}")
        crops = random_crops(built.steps, args.index_patches, args.seed)
        embedder.embed(crops[:args.batch_size])  # warm-up
        with Meter() as bound:
            for start in range(0, len(crops), args.batch_size):  # one chunk per call, as embed_sources calls it
                embedder.embed(crops[start:start + args.batch_size]).float().cpu().numpy()
        with Meter() as indexing:
            results = list(embed_sources(jobs, embedder, Tiling(), built.steps, args.index_workers, progress=False))
    embedded = sum(len(result.vectors) for result in results)
    if embedded != args.index_patches or any(result.error or result.failed for result in results):
        raise RuntimeError(f"indexing embedded {embedded} of {args.index_patches} patches")
    bound_rate = args.index_patches / bound.wall
    setting = f"{args.index_patches} PNG patches of {args.patch_size} px, --workers {args.index_workers}"
    model_row = row("model-bound, as many crops", built, precision, args.batch_size, args.index_patches, bound,
                    note=f"random uint8 crops, as many as {setting}")
    index_row = row("index (embed_sources, folder)", built, precision, args.batch_size, embedded, indexing,
                    note=setting)
    index_row["model_bound_patches_per_s"] = round(bound_rate, 2)
    index_row["fraction"] = round(args.index_patches / indexing.wall / bound_rate, 3)
    return [model_row, index_row]


# ----------------------------------------------------------------------------- the benchmark
def machine() -> dict:
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": cpu_runs_natively(torch.bfloat16),
            "bf16_flags": " ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})) or "none",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES),
                        help=f"families to measure (default: {' '.join(FAMILIES)})")
    parser.add_argument("--amp", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="float32, and bf16 autocast where the CPU runs it natively (default: float32 bf16)")
    parser.add_argument("--batch-size", type=int, default=16, help="patches per forward pass (default: 16)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="timed seconds per model-bound figure, whole batches, at least one (default: 5)")
    parser.add_argument("--index-encoder", default="vit_s", choices=(*FAMILIES, "none"),
                        help="family whose indexing rate is compared with its model-bound rate, or none "
                             "(default: vit_s)")
    parser.add_argument("--index-patches", type=int, default=256,
                        help="patch images in the indexed folder (default: 256)")
    parser.add_argument("--patch-size", type=int, default=300,
                        help="side of the generated patch images, px (default: 300, data_process.py's output)")
    parser.add_argument("--index-workers", type=int, default=1,
                        help="reader processes of the indexing DataLoader (default: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and images (default: 0)")
    parser.add_argument("--out", default=None,
                        help="results file: JSON, or CSV when it ends in .csv (default: only print the table)")
    return parser


def check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.seconds >= 0:
        raise UserError(f"--seconds must be 0 or more, got {args.seconds}")
    if args.index_patches < 1 or args.patch_size < 8 or args.index_workers < 0:
        raise UserError("--index-patches must be at least 1, --patch-size at least 8, --index-workers 0 or more")


def run(args: argparse.Namespace) -> list[dict]:
    native = cpu_runs_natively(torch.bfloat16)
    rows = []
    names = list(args.encoders) + ([args.index_encoder] if args.index_encoder not in ("none", *args.encoders) else [])
    for name in names:
        built = build(name, args.seed)
        batch = random_crops(built.steps, args.batch_size, args.seed)
        for precision in args.amp:
            if precision == "bf16" and not native:
                rows.append(row("model-bound", built, precision, args.batch_size,
                                note="not native: this CPU has no bfloat16 instructions oneDNN uses; skipped"))
                continue
            if name in args.encoders:
                embedder = Embedder(built.model, "cpu", args.batch_size, "bf16" if precision == "bf16" else "off",
                                    preprocessing=built.preprocessing)
                patches, meter = model_bound(embedder, batch, args.seconds)
                rows.append(row("model-bound", built, precision, args.batch_size, patches, meter,
                                note="Embedder.embed of random uint8 crops"))
                print(f"{name} {precision}: {rows[-1]['patches_per_s']} patches/s", flush=True)
            if name == args.index_encoder:
                rows += index_rows(built, args, precision)
                print(f"{name} {precision} indexing: {rows[-1]['patches_per_s']} patches/s, "
                      f"{rows[-1]['fraction']} of model-bound", flush=True)
        del built
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | encoder | input | dim | precision | batch | patches/s | vs model-bound | other cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["patches_per_s"] if r["patches_per_s"] is not None else r["note"]
        versus = f"{r['fraction']:.2f} (model-bound {r['model_bound_patches_per_s']})" if r["fraction"] else "-"
        other = "-" if r["other_cores"] is None else r["other_cores"]
        lines.append(f"| {r['case']} | {r['encoder']} | {r['input']} | {r['dim']} | {r['precision']} | "
                     f"{r['batch_size']} | {rate} | {versus} | {other} |")
    return "\n".join(lines)


def write(path: str, rows: list[dict], about: dict) -> None:
    """JSON ({"command", "machine", "settings", "rows"}), or CSV with the command and machine on every row."""
    if path.endswith(".csv"):
        buffer = io.StringIO()
        context = {"command": about["command"], **{f"machine_{k}": v for k, v in about["machine"].items()},
                   **{f"setting_{k}": " ".join(map(str, v)) if isinstance(v, list) else v
                      for k, v in about["settings"].items()}}
        writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *context], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r.get(k) for k in COLUMNS}, **context})
        atomic_write_text(path, buffer.getvalue())
    else:
        atomic_write_text(path, json.dumps({**about, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    about = {"command": command_line(), "machine": machine(),
             "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    print(f"{about['machine']['cpu']}, {about['machine']['cpu_count']} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), bfloat16 {'native' if about['machine']['bf16_native'] else 'not native'}",
          flush=True)
    rows = run(args)
    print("\n" + markdown(rows))
    if args.out:
        write(args.out, rows, about)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(lambda _: main(), None))  # a UserError: one line, exit status 2
