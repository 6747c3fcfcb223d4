"""Turn a data set into the 300x300 training and test folders the rest of the project reads.

    python3 KIMIA_data/data_process.py [SOURCE] [--out DIR] [--size 300] [--workers N] [--overwrite]

SOURCE (default: KIMIAPath24_RGB at the repository root, where the reference expects it) is one of:
  1. the RGB folder release: SOURCE/Training/<class>/... and SOURCE/RGBPatches-test/<class>/...;
  2. the official HDF5 file Kimia_Path24.h5 (or a folder holding it): test patches from
     /test_data/patches, training patches cut from each /scan{id}/data as non-overlapping tiles
     the size of a test patch (1000x1000 in the official file), class s{id};
  3. any folder with SOURCE/train/<class>/... and SOURCE/test/<class>/... (your own data).

Every image becomes a size x size RGB PNG named <class>_<stem>.png in DIR/train/<class>/ and
DIR/test/<class>/ (DIR defaults to the KIMIA_data folder). The resize is Pillow's antialiased
bicubic filter (computed with torch's faster uint8 kernels, within 1 grey level of Pillow's output),
not the reference's cv2.resize(INTER_CUBIC), which skips low-pass filtering when it shrinks
1000 to 300 px and so aliases fine texture (SPEC.md section 1). JPEGs are decoded at a reduced size
first (Pillow's draft mode: the largest power-of-two reduction that stays at least the target size,
done in the DCT domain), then go through the same bicubic resize.

HDF5 tile rule: a tile is split into 8 x 8 blocks; a block is blank when at least 99% of its pixels
are near-white (every channel >= 220: bare glass, or the whitened test regions); a tile with more
than half of its blocks blank is dropped. Counting blank blocks rather than white pixels keeps
fat-rich tissue, whose cells are white inside but bounded by membranes every few blocks.

PNGs are encoded with OpenCV's default settings, as the reference's cv2.imwrite does.

Writes DIR/manifest.csv (source, split, class, output for every image) and DIR/data_process.json
(command, settings, classes, counts). Re-running skips outputs that are complete; --overwrite
redoes them. Unreadable images are listed at the end and make the exit status 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from any directory
import utils  # noqa: E402

DEFAULT_SOURCE = utils.REPO_ROOT / "KIMIAPath24_RGB"
HDF5_NAME = "Kimia_Path24.h5"
SPLITS = ("train", "test")
LAYOUTS = (f"(1) the RGB folder release SOURCE/Training/<class>/ and SOURCE/RGBPatches-test/<class>/, "
           f"(2) the HDF5 file {HDF5_NAME} (or a folder holding it), "
           f"(3) SOURCE/train/<class>/ and SOURCE/test/<class>/")
WHITE_LEVEL = 220  # a pixel with every channel at least this bright is glass or whitened
BLANK_BLOCK_FRACTION = 0.99  # a block this near-white is blank
MAX_BLANK_BLOCKS = 0.5  # a tile with more blank blocks than this is dropped
BLOCKS_PER_SIDE = 8


# ----------------------------------------------------------------------------- items
@dataclass(frozen=True)
class Item:
    """One output image and where it comes from.

    `source` is an image file, or the HDF5 file when `dataset` is set: then `index` picks a test
    patch (`tile` 0) or `index` is (row, column) of a `tile` x `tile` tile of a scan.
    """
    split: str
    class_name: str
    output: Path
    source: Path
    dataset: str | None = None
    index: int | tuple[int, int] = 0
    tile: int = 0

    def describe(self) -> str:
        if self.dataset is None:
            return str(self.source)
        if self.tile:
            row, col = self.index
            return (f"{self.source}:{self.dataset}[{row * self.tile}:{(row + 1) * self.tile},"
                    f"{col * self.tile}:{(col + 1) * self.tile}]")
        return f"{self.source}:{self.dataset}[{self.index}]"


def output_path(out: Path, split: str, class_name: str, stem: str) -> Path:
    return out / split / class_name / f"{class_name}_{stem}.png"


def _image_files(folder: Path) -> list[Path]:
    return [folder / name for name in utils.natural_sorted(os.listdir(folder))
            if utils.is_image_file(name) and (folder / name).is_file()]


def _check_class_names(names: list[str], where: Path) -> None:
    bad = [n for n in names if "_" in n]
    if bad:
        raise utils.UserError(f"{where}: class folder names {bad} contain '_', which breaks the file-name "
                              "labels (<class>_<stem>.png); rename them (for example with '-')")


def folder_items(split_dirs: dict[str, Path], out: Path) -> list[Item]:
    """Items of a layout with one folder of class folders per split."""
    for split_dir in split_dirs.values():
        _check_class_names(utils.list_classes(split_dir), split_dir)
    items = []
    for split, split_dir in split_dirs.items():
        for class_name in utils.list_classes(split_dir):
            for path in _image_files(split_dir / class_name):
                items.append(Item(split, class_name, output_path(out, split, class_name, path.stem), path))
    return items


def _scan_ids(h5) -> list[int]:
    return sorted(int(m.group(1)) for name in h5 if (m := re.fullmatch(r"scan(\d+)", name))
                  and "data" in h5[name])


def hdf5_items(path: Path, out: Path, tile: int | None = None) -> list[Item]:
    """Test patches, and every full tile of every scan (the tile rule is applied when reading)."""
    import h5py

    with h5py.File(path, "r") as h5:
        if "test_data/patches" not in h5 or "test_data/targets" not in h5:
            raise utils.UserError(f"{path}: no /test_data/patches and /test_data/targets; is it {HDF5_NAME}?")
        patches = h5["test_data/patches"]
        targets = np.asarray(h5["test_data/targets"][()]).reshape(-1).astype(int)
        if len(targets) != len(patches):
            raise utils.UserError(f"{path}: {len(patches)} test patches but {len(targets)} targets")
        tile = tile or _patch_shape(patches.shape)[0]
        items = [Item("test", f"s{t}", output_path(out, "test", f"s{t}", f"test_{i}"), path,
                      "test_data/patches", i) for i, t in enumerate(targets)]
        for scan_id in _scan_ids(h5):
            name = f"scan{scan_id}/data"
            height, width = h5[name].shape[:2]
            for row in range(height // tile):
                for col in range(width // tile):
                    items.append(Item("train", f"s{scan_id}",
                                      output_path(out, "train", f"s{scan_id}", f"tile_r{row}_c{col}"),
                                      path, name, (row, col), tile))
    return items


def _patch_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the patches of an n x H x W [x C] or n x C x H x W dataset."""
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        return shape[2], shape[3]
    return shape[1], shape[2]


def discover(source: Path, out: Path, tile: int | None = None) -> tuple[str, list[Item]]:
    """Recognise the layout of `source` and list its items; raises UserError naming the layouts."""
    if not source.exists():
        hint = ""
        if source == DEFAULT_SOURCE:
            hint = ("; to use the built-in synthetic data set instead run: python3 KIMIA_data/synthetic.py && "
                    "python3 KIMIA_data/data_process.py KIMIA_data/synthetic_source")
        raise utils.UserError(f"{source}: no such file or folder; SOURCE must be one of {LAYOUTS}{hint}")
    if source.is_dir() and (source / HDF5_NAME).is_file():
        source = source / HDF5_NAME
    if source.is_file():
        import h5py

        if not h5py.is_hdf5(source):
            raise utils.UserError(f"{source}: not an HDF5 file; SOURCE must be one of {LAYOUTS}")
        return f"HDF5 file ({source.name})", hdf5_items(source, out, tile)
    if (source / "Training").is_dir() and (source / "RGBPatches-test").is_dir():
        return ("RGB folder release (Training/, RGBPatches-test/)",
                folder_items({"train": source / "Training", "test": source / "RGBPatches-test"}, out))
    if (source / "train").is_dir() and (source / "test").is_dir():
        return "image folders (train/, test/)", folder_items({s: source / s for s in SPLITS}, out)
    raise utils.UserError(f"{source}: unrecognised layout; SOURCE must be one of {LAYOUTS}")


def check_plan(source: Path, out: Path, items: list[Item]) -> None:
    """Refuse before any work: nothing to do, outputs inside the source, two inputs to one output."""
    if not items:
        raise utils.UserError(f"{source}: no images found (accepted: {', '.join(sorted(utils.IMAGE_EXTENSIONS))})")
    source_root = source.resolve()
    for split in SPLITS:
        target = (out / split).resolve()
        if target == source_root or source_root in target.parents or target in source_root.parents:
            raise utils.UserError(f"--out {out}: its {split}/ folder overlaps SOURCE {source}, which must not be "
                                  "modified; choose another --out")
    seen: dict[Path, Item] = {}
    for item in items:
        if item.output in seen:
            raise utils.UserError(f"{item.describe()} and {seen[item.output].describe()} would both become "
                                  f"{item.output}; rename one of them")
        seen[item.output] = item


# ----------------------------------------------------------------------------- one image
_open_hdf5: dict[Path, object] = {}  # per process: h5py handles must not cross a fork


def _hdf5(path: Path):
    if path not in _open_hdf5:
        import h5py

        _open_hdf5[path] = h5py.File(path, "r")
    return _open_hdf5[path]


def to_uint8_image(array: np.ndarray) -> Image.Image:
    """An RGB image from an H x W [x C] array of uint8, 16-bit or [0, 1] float values."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if array.dtype.itemsize == 2 or array.max(initial=0) > 255:
            array = array / 257.0  # 16-bit
        elif np.issubdtype(array.dtype, np.floating):
            array = array * 255.0  # [0, 1]
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    return _flatten(image)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (a transparent area has no tissue)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: Path, size: int) -> Image.Image:
    """Decode an image file as 8-bit RGB; JPEGs at a reduced size that is still at least `size`."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        if image.mode.startswith(("I", "F")):  # 16-bit or 32-bit grey: rescale, not clip
            return to_uint8_image(np.asarray(image))
        image.load()
        return _flatten(image)


def load_item(item: Item, size: int) -> Image.Image | None:
    """The item's image, or None for an HDF5 tile that the tile rule drops."""
    if item.dataset is None:
        return load_image(item.source, size)
    dataset = _hdf5(item.source)[item.dataset]
    if not item.tile:
        return to_uint8_image(np.asarray(dataset[item.index]))
    row, col = item.index
    window = np.asarray(dataset[row * item.tile:(row + 1) * item.tile, col * item.tile:(col + 1) * item.tile])
    image = to_uint8_image(window)
    return None if is_blank_tile(np.asarray(image)) else image


def is_blank_tile(rgb: np.ndarray, white_level: int = WHITE_LEVEL, blocks: int = BLOCKS_PER_SIDE,
                  blank_block_fraction: float = BLANK_BLOCK_FRACTION,
                  max_blank_blocks: float = MAX_BLANK_BLOCKS) -> bool:
    """True when more than `max_blank_blocks` of the tile's blocks x blocks blocks are blank
    (at least `blank_block_fraction` of their pixels have every channel >= `white_level`)."""
    white = (rgb >= white_level).all(axis=2) if rgb.ndim == 3 else rgb >= white_level
    h, w = white.shape
    bh, bw = h // blocks, w // blocks
    per_block = white[:bh * blocks, :bw * blocks].reshape(blocks, bh, blocks, bw).mean(axis=(1, 3))
    return float((per_block >= blank_block_fraction).mean()) > max_blank_blocks


def is_complete(path: Path, size: int) -> bool:
    """An existing output that decodes fully as a size x size RGB PNG."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != (size, size) or image.mode != "RGB":
                return False
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def resize_bicubic(image: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 uint8 array in OpenCV's BGR order: Pillow's antialiased bicubic filter,
    computed by torch's uint8 kernels (torch's antialias=True follows Pillow's filter), about twice
    as fast as Pillow's own; values differ from Pillow's by at most 1 (rounding)."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # 1 x 3 x H x W, channels last
    planes = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].numpy()
    return cv2.merge((planes[2], planes[1], planes[0]))  # interleaves the planes, RGB to BGR on the way


def save_png(bgr: np.ndarray, path: Path, compression: int | None = None) -> None:
    """Encode with OpenCV (default settings: the reference's; about 3x faster than Pillow's fastest
    level at the same size), or at zlib `compression` 0-9; written through a temp file and a rename."""
    ok, data = cv2.imencode(".png", bgr, [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    utils.atomic_write(path, lambda tmp: Path(tmp).write_bytes(data.tobytes()))


def convert(item: Item, size: int, overwrite: bool, png_compression: int | None = None) -> tuple[Item, str, str]:
    """Process one item; returns (item, status, detail) with status written, skipped, dropped or failed.

    Any exception is caught so that one bad image never stops the others; it is reported at the end.
    """
    if not overwrite and is_complete(item.output, size):
        return item, "skipped", ""
    try:
        image = load_item(item, size)
        if image is None:
            return item, "dropped", ""
        if image.size == (size, size):
            bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
        else:
            bgr = resize_bicubic(image, size)
        save_png(bgr, item.output, png_compression)
        return item, "written", ""
    except Exception as err:  # noqa: BLE001 - see the docstring
        return item, "failed", f"{type(err).__name__}: {err}".splitlines()[0]


def _convert_job(job: tuple[Item, int, bool, int | None]) -> tuple[Item, str, str]:
    return convert(*job)


def run_items(items: list[Item], size: int, overwrite: bool, workers: int,
              png_compression: int | None = None) -> Iterator[tuple[Item, str, str]]:
    jobs = [(item, size, overwrite, png_compression) for item in items]
    if workers <= 1:
        try:
            yield from map(_convert_job, jobs)
        finally:  # a later fork must not inherit open HDF5 handles
            while _open_hdf5:
                _open_hdf5.popitem()[1].close()
        return
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap_unordered(_convert_job, jobs, chunksize=chunk)


# ----------------------------------------------------------------------------- reports
def count_table(counts: Counter, classes: list[str], dropped: Counter) -> str:
    lines = ["class  train   test" + ("  dropped tiles" if dropped else "")]
    for name in classes:
        line = f"{name:<6}{counts['train', name]:>6}{counts['test', name]:>7}"
        lines.append(line + (f"{dropped[name]:>15}" if dropped else ""))
    lines.append(f"{'total':<6}{sum(counts[('train', c)] for c in classes):>6}"
                 f"{sum(counts[('test', c)] for c in classes):>7}" + (f"{sum(dropped.values()):>15}" if dropped else ""))
    return "\n".join(lines)


def manifest_text(out: Path, done: list[Item]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "split", "class", "output"])
    for item in sorted(done, key=lambda i: (SPLITS.index(i.split), utils.natural_key(i.class_name),
                                            utils.natural_key(i.output.name))):
        writer.writerow([item.describe(), item.split, item.class_name, item.output.relative_to(out).as_posix()])
    return buffer.getvalue()


def stale_outputs(out: Path, done: list[Item]) -> list[Path]:
    """Images under out/train and out/test that this run did not produce (from an earlier source)."""
    produced = {item.output for item in done}
    stale = []
    for split in SPLITS:
        root = out / split
        if root.is_dir():
            stale += [p for p in root.glob("*/*") if utils.is_image_file(p) and p not in produced]
    return stale


# ----------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize a data set into KIMIA_data/train and KIMIA_data/test.")
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE),
                        help="RGB release folder, Kimia_Path24.h5, or a folder with train/ and test/ "
                             "(default: KIMIAPath24_RGB at the repository root)")
    parser.add_argument("--out", default=str(utils.DATA_ROOT), help="output folder (default: the KIMIA_data folder)")
    parser.add_argument("--size", type=int, default=300, help="output side in px (default: 300)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--png-compression", type=int, default=None, metavar="0-9",
                        help="zlib level of the PNGs; 0 (none) is the fastest, with files about 1.9x larger "
                             "(default: OpenCV's own setting, as the reference)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist (default: skip them)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="HDF5 only: side of the training tiles cut from the scans (default: the test patches' side)")
    return parser


@utils.exit_on_user_error
def main(args: argparse.Namespace) -> dict:
    if args.size < 1:
        raise utils.UserError(f"--size must be a positive number of pixels, got {args.size}")
    if args.png_compression is not None and not 0 <= args.png_compression <= 9:
        raise utils.UserError(f"--png-compression must be 0 to 9, got {args.png_compression}")
    if args.workers is not None and args.workers < 1:
        raise utils.UserError(f"--workers must be at least 1, got {args.workers}")
    if args.tile_size is not None and args.tile_size < BLOCKS_PER_SIDE:
        raise utils.UserError(f"--tile-size must be at least {BLOCKS_PER_SIDE}, got {args.tile_size}")
    source, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    layout, items = discover(source, out, args.tile_size)
    check_plan(source, out, items)
    workers = args.workers or os.cpu_count() or 1
    print(f"found: {layout} at {source}; {len(items)} images to check, {workers} worker(s)")

    statuses: Counter = Counter()
    done: list[Item] = []
    failures: list[tuple[Item, str]] = []
    dropped: Counter = Counter()
    results = run_items(items, args.size, args.overwrite, workers, args.png_compression)
    for item, status, detail in tqdm(results, total=len(items), unit="img", disable=None):
        statuses[status] += 1
        if status in ("written", "skipped"):
            done.append(item)
        elif status == "dropped":
            dropped[item.class_name] += 1
        else:
            failures.append((item, detail))

    classes = utils.natural_sorted({item.class_name for item in items})
    counts = Counter((item.split, item.class_name) for item in done)
    print(count_table(counts, classes, dropped))
    utils.atomic_write_text(out / "manifest.csv", manifest_text(out, done))
    record = {"command": utils.command_line(), "source": str(source.resolve()), "layout": layout,
              "size": args.size, "png_compression": args.png_compression, "resize": "antialiased bicubic (Pillow's filter, torch uint8 kernels); JPEG draft decoding",
              "classes": classes,
              "counts": {split: {c: counts[split, c] for c in classes} for split in SPLITS},
              "failed": [item.describe() for item, _ in failures]}
    tile_sizes = {item.tile for item in items if item.tile}
    if tile_sizes:
        record["tile_rule"] = {"tile_size": tile_sizes.pop(),
                               "white_level": WHITE_LEVEL, "blocks_per_side": BLOCKS_PER_SIDE,
                               "blank_block_fraction": BLANK_BLOCK_FRACTION, "max_blank_blocks": MAX_BLANK_BLOCKS,
                               "dropped": dict(dropped)}
    utils.atomic_write_text(out / "data_process.json", json.dumps(record, indent=1) + "\n")
    print(f"{statuses['written']} written, {statuses['skipped']} already complete (skipped), "
          f"{sum(dropped.values())} tiles dropped, {len(failures)} failed; manifest: {out / 'manifest.csv'}")
    stale = stale_outputs(out, done)
    if stale:
        print(f"warning: {len(stale)} images under {out / 'train'} and {out / 'test'} are not from {source} "
              f"(e.g. {stale[0]}); remove them unless you mean to mix data sets", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} images could not be read and were left out:", file=sys.stderr)
        for item, detail in failures:
            print(f"  {item.describe()}: {detail}", file=sys.stderr)
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main(get_args_parser().parse_args())
