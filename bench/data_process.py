"""Speed of KIMIA_data/data_process.py against the reference's own preprocessing loop.

Builds its own 1000x1000 JPEG patches (the synthetic generator's RGB release, like Kimia Path24's)
in a temporary folder, then times on the same images:
  (a) the reference loop: one process, cv2.imread, cv2.resize(300x300, INTER_CUBIC), cv2.imwrite PNG;
  (b) data_process.main with --workers 1 and with --workers N (default 2).
Prints a Markdown table with ms per image and the speed-up of (b) over (a).

    python3 bench/data_process.py [--count 150] [--workers 2] [--patch-size 1000] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402

import utils  # noqa: E402
from KIMIA_data import data_process, synthetic  # noqa: E402

IMAGES_PER_CLASS = 25


def reference_loop(source: Path, out: Path, size: int) -> int:
    """The reference's KIMIA_data/data_process.py, minus its file-system-order class list."""
    count = 0
    for split, folder in (("train", "Training"), ("test", "RGBPatches-test")):
        for class_name in utils.list_classes(source / folder):
            target = out / split / class_name
            target.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(source / folder / class_name)):
                image = cv2.imread(str(source / folder / class_name / name))
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(target / f"{class_name}_{Path(name).stem}.png"), image)
                count += 1
    return count


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time data_process.py against the reference loop.")
    parser.add_argument("--count", type=int, default=600,
                        help="number of JPEG inputs, about; enough to amortise starting the worker processes, as "
                             "the 27,000 images of Kimia Path24 do (default: 600)")
    parser.add_argument("--workers", type=int, default=2, help="data_process workers (default: 2)")
    parser.add_argument("--patch-size", type=int, default=1000, help="input side in px (default: 1000)")
    parser.add_argument("--size", type=int, default=300, help="output side in px (default: 300)")
    parser.add_argument("--quick", action="store_true", help="only 24 images, to check that it runs (default: off)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    count = 24 if args.quick else args.count
    classes = max(1, min(synthetic.MAX_CLASSES, round(count / IMAGES_PER_CLASS)))
    per_class = max(2, round(count / classes))
    with tempfile.TemporaryDirectory(prefix="bench_data_process_") as tmp:
        source = Path(tmp) / "source"
        synthetic.make_rgb_release(source, num_classes=classes, patch_size=args.patch_size,
                                   train_per_class=per_class - 1, test_per_class=1, seed=0)
        start = time.perf_counter()
        images = reference_loop(source, Path(tmp) / "reference", args.size)
        reference_s = time.perf_counter() - start

        rows = [{"method": "reference loop (cv2, 1 process)", "workers": 1, "images": images,
                 "seconds": reference_s}]
        # one worker too: the per-image cost, which a busy machine cannot blur
        for workers, extra in [(w, []) for w in sorted({1, args.workers})] + [(args.workers, ["--png-compression", "0"])]:
            ours = data_process.get_args_parser().parse_args(
                [str(source), "--out", str(Path(tmp) / f"ours{workers}{''.join(extra)}"), "--size", str(args.size),
                 "--workers", str(workers), *extra])
            start = time.perf_counter()
            data_process.main(ours)
            rows.append({"method": " ".join(["data_process.py", *extra]), "workers": workers, "images": images,
                         "seconds": time.perf_counter() - start})

    for row in rows:
        row["ms_per_image"] = 1000.0 * row["seconds"] / row["images"]
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    print(f"\n{images} JPEGs of {args.patch_size}x{args.patch_size} -> {args.size}x{args.size} PNG, "
          f"{os.cpu_count()} cores\n")
    print("| method | workers | images | ms/image | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['method']} | {row['workers']} | {row['images']} | {row['ms_per_image']:.2f} "
              f"| {row['speedup']:.2f}x |")
    return [{"benchmark": "data_process",
             "case": f"{row['images']} JPEGs {args.patch_size} px -> {args.size} px PNG, {row['method']}, "
                     f"{row['workers']} worker(s)",
             "ours": round(row["ms_per_image"], 2), "baseline": round(rows[0]["ms_per_image"], 2),
             "unit": "ms/image", "speedup": f"{row['speedup']:.2f}x"} for row in rows[1:]]


if __name__ == "__main__":
    main()
