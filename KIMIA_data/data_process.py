"""Turn a data set into the 300x300 training and test folders the rest of the project reads.

    python3 KIMIA_data/data_process.py [SOURCE] [--out DIR] [--size 300] [--resize reference|antialias]
        [--workers N] [--png-compression 0-9] [--overwrite] [--keep-truncated] [--tile-size N]

SOURCE (default: KIMIAPath24_RGB at the repository root, where the reference expects it) is one of:
  1. the RGB folder release: SOURCE/Training/<class>/... and SOURCE/RGBPatches-test/<class>/...;
  2. the official HDF5 file Kimia_Path24.h5 (or a folder holding it): test patches from
     /test_data/patches, training patches cut from each /scan{id}/data as non-overlapping tiles
     the size of a test patch (1000x1000 in the official file), class s{id};
  3. any folder with SOURCE/train/<class>/... and SOURCE/test/<class>/... (your own data).

Every image becomes a size x size PNG named <class>_<stem>.png in DIR/train/<class>/ and
DIR/test/<class>/ (DIR defaults to the KIMIA_data folder), resized one of two ways
(docs/reproduction.md, section Data):
  --resize reference (default): the reference script's pixels, bit for bit: cv2.imread (colour flag:
     8-bit BGR, grey replicated, alpha dropped, 16-bit shifted to 8-bit), cv2.resize(INTER_CUBIC),
     and the PNG encoded by OpenCV with its default settings. INTER_CUBIC samples a 4x4
     neighbourhood without low-pass filtering, so shrinking 1000 to 300 px aliases fine texture.
  --resize antialias: Pillow's antialiased bicubic filter (computed with torch's uint8 kernels,
     within 1 grey level of Pillow's output), after a reduced-size JPEG decode (Pillow's draft mode:
     the largest power-of-two reduction that stays at least the target size, done in the DCT
     domain); transparency is composited over white and 16-bit values are rescaled. Only this
     mode imports torch and Pillow.
HDF5 patches and tiles are converted to 8-bit (16-bit values / 257, floats in [0, 1] * 255) and
resized the same way.

HDF5 tile rule: a tile is split into 8 x 8 blocks; a block is blank when at least 99% of its pixels
are near-white (every channel >= 220: bare glass, or the whitened test regions); a tile with more
than half of its blocks blank is dropped. Counting blank blocks rather than white pixels keeps
fat-rich tissue, whose cells are white inside but bounded by membranes every few blocks.

The images are processed by --workers threads (OpenCV, Pillow and torch release the GIL while they
decode, resize and encode), so nothing is paid for starting processes, and the command asks glibc to
keep freed memory for the next image rather than fault it in afresh (keep_freed_memory).

Writes DIR/manifest.csv (source, split, class, output for every image) and DIR/data_process.json
(command, settings, classes, counts). Re-running skips outputs that are complete; --overwrite
redoes them. Unreadable images are listed at the end; main() returns the record with them under
"failed", and the command then exits with status 1.

A truncated JPEG or PNG file (its end marker, FF D9 or the IEND chunk, is not among its last
TAIL_BYTES bytes: OpenCV would only warn and fill the missing part with grey) is left out and listed
with the unreadable ones; --keep-truncated writes it as OpenCV decodes it instead, and it is still
listed at the end (record["truncated"]), with exit status 1. Only files are checked (HDF5 patches
are arrays). With --resize antialias, Pillow refuses truncated files, so --keep-truncated keeps none.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import cv2
import numpy as np

# the library's torch-free modules only: importing torch would cost more start-up than the work on 600 images
from histo_retrieval.errors import UserError, one_line, run_script
from histo_retrieval.files import (IMAGE_EXTENSIONS, atomic_write_bytes, atomic_write_text, command_line,
                                   folder_images, is_image_file, list_classes, natural_key, natural_sorted)

if TYPE_CHECKING:
    from PIL import Image

DATA_ROOT = Path(__file__).resolve().parent
DEFAULT_SOURCE = DATA_ROOT.parent / "KIMIAPath24_RGB"
HDF5_NAME = "Kimia_Path24.h5"
SPLITS = ("train", "test")
LAYOUTS = (f"(1) the RGB folder release SOURCE/Training/<class>/ and SOURCE/RGBPatches-test/<class>/, "
           f"(2) the HDF5 file {HDF5_NAME} (or a folder holding it), "
           f"(3) SOURCE/train/<class>/ and SOURCE/test/<class>/")
RESIZES = {  # --resize choice: what it does, as recorded in data_process.json
    "reference": "cv2.imread (colour), cv2.resize INTER_CUBIC, as the reference",
    "antialias": "antialiased bicubic (Pillow's filter, torch uint8 kernels); JPEG draft decoding",
}
WHITE_LEVEL = 220  # a pixel with every channel at least this bright is glass or whitened
BLANK_BLOCK_FRACTION = 0.99  # a block this near-white is blank
MAX_BLANK_BLOCKS = 0.5  # a tile with more blank blocks than this is dropped
BLOCKS_PER_SIDE = 8
# A whole file's end marker is among its last TAIL_BYTES bytes (room for a little trailing padding);
# in a cut-off JPEG the last bytes are entropy-coded data, where byte stuffing rules out FF D9.
TAIL_BYTES = 1024
END_MARKERS = {  # file signature: (end marker, what it is)
    b"\xff\xd8\xff": (b"\xff\xd9", "JPEG end marker FF D9"),
    b"\x89PNG\r\n\x1a\n": (b"IEND", "PNG end chunk IEND"),
}


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


def _check_class_names(names: list[str], where: Path) -> None:
    bad = [n for n in names if "_" in n]
    if bad:
        raise UserError(f"{where}: class folder names {bad} contain '_', which breaks the file-name "
                        "labels (<class>_<stem>.png); rename them (for example with '-')")


def folder_items(split_dirs: dict[str, Path], out: Path) -> list[Item]:
    """Items of a layout with one folder of class folders per split."""
    for split_dir in split_dirs.values():
        _check_class_names(list_classes(split_dir), split_dir)
    items = []
    for split, split_dir in split_dirs.items():
        for class_name in list_classes(split_dir):
            for path in folder_images(split_dir / class_name):
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
            raise UserError(f"{path}: no /test_data/patches and /test_data/targets; is it {HDF5_NAME}?")
        patches = h5["test_data/patches"]
        targets = np.asarray(h5["test_data/targets"][()]).reshape(-1).astype(int)
        if len(targets) != len(patches):
            raise UserError(f"{path}: {len(patches)} test patches but {len(targets)} targets")
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
        raise UserError(f"{source}: no such file or folder; SOURCE must be one of {LAYOUTS}{hint}")
    if source.is_dir() and (source / HDF5_NAME).is_file():
        source = source / HDF5_NAME
    if source.is_file():
        import h5py

        if not h5py.is_hdf5(source):
            raise UserError(f"{source}: not an HDF5 file; SOURCE must be one of {LAYOUTS}")
        return f"HDF5 file ({source.name})", hdf5_items(source, out, tile)
    if (source / "Training").is_dir() and (source / "RGBPatches-test").is_dir():
        return ("RGB folder release (Training/, RGBPatches-test/)",
                folder_items({"train": source / "Training", "test": source / "RGBPatches-test"}, out))
    if (source / "train").is_dir() and (source / "test").is_dir():
        return "image folders (train/, test/)", folder_items({s: source / s for s in SPLITS}, out)
    raise UserError(f"{source}: unrecognised layout; SOURCE must be one of {LAYOUTS}")


def check_plan(source: Path, out: Path, items: list[Item]) -> None:
    """Refuse before any work: nothing to do, outputs inside the source, two inputs to one output."""
    if not items:
        raise UserError(f"{source}: no images found (accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    source_root = source.resolve()
    for split in SPLITS:
        target = (out / split).resolve()
        if target == source_root or source_root in target.parents or target in source_root.parents:
            raise UserError(f"--out {out}: its {split}/ folder overlaps SOURCE {source}, which must not be "
                                  "modified; choose another --out")
    seen: dict[Path, Item] = {}
    for item in items:
        if item.output in seen:
            raise UserError(f"{item.describe()} and {seen[item.output].describe()} would both become "
                                  f"{item.output}; rename one of them")
        seen[item.output] = item


# ----------------------------------------------------------------------------- one image
_open_hdf5: dict[Path, object] = {}  # h5py handles of this run, shared by the threads (h5py serialises them)
_open_hdf5_lock = threading.Lock()


def _hdf5(path: Path):
    with _open_hdf5_lock:
        if path not in _open_hdf5:
            import h5py

            _open_hdf5[path] = h5py.File(path, "r")
        return _open_hdf5[path]


def _close_hdf5() -> None:
    with _open_hdf5_lock:
        while _open_hdf5:
            _open_hdf5.popitem()[1].close()


def read_hdf5(item: Item) -> np.ndarray:
    """The item's test patch or scan tile, as stored."""
    dataset = _hdf5(item.source)[item.dataset]
    if not item.tile:
        return np.asarray(dataset[item.index])
    row, col = item.index
    return np.asarray(dataset[row * item.tile:(row + 1) * item.tile, col * item.tile:(col + 1) * item.tile])


def to_uint8_array(array: np.ndarray) -> np.ndarray:
    """H x W or H x W x C (C 2-4) uint8 from an H x W [x C] or C x H x W array of uint8, 16-bit or
    [0, 1] float values."""
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
    return np.ascontiguousarray(array)


def to_bgr(array: np.ndarray) -> np.ndarray:
    """8-bit BGR as cv2.imread's colour flag makes it from a file: grey replicated, alpha dropped."""
    array = to_uint8_array(array)
    if array.ndim == 2 or array.shape[2] == 2:
        return cv2.cvtColor(array if array.ndim == 2 else np.ascontiguousarray(array[..., 0]), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGR)


def truncation(path: Path) -> str | None:
    """Why a JPEG or PNG file looks cut short, or None (a whole file, or another format): reads its
    first and last bytes only, so the check costs next to nothing beside the decode."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
        tail = f.read()
    for signature, (marker, name) in END_MARKERS.items():
        if head.startswith(signature) and marker not in tail:
            return f"truncated: no {name} at its end"
    return None


def reference_bgr(item: Item, size: int) -> np.ndarray | None:
    """The reference's resize of the item: cv2.imread, cv2.resize(INTER_CUBIC); None for a dropped tile."""
    if item.dataset is None:
        bgr = cv2.imread(str(item.source))  # the colour flag, as the reference: 8-bit BGR
        if bgr is None:
            raise OSError("OpenCV cannot decode it (not an image, truncated, or unreadable)")
    else:
        bgr = to_bgr(read_hdf5(item))
        if item.tile and is_blank_tile(bgr):
            return None
    return cv2.resize(bgr, (size, size), interpolation=cv2.INTER_CUBIC)


def to_uint8_image(array: np.ndarray) -> Image.Image:
    """An RGB image from an H x W [x C] array of uint8, 16-bit or [0, 1] float values."""
    from PIL import Image

    return _flatten(Image.fromarray(to_uint8_array(array)))


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (a transparent area has no tissue)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: Path, size: int) -> Image.Image:
    """Decode an image file as 8-bit RGB; JPEGs at a reduced size that is still at least `size`."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        if image.mode.startswith(("I", "F")):  # 16-bit or 32-bit grey: rescale, not clip
            return to_uint8_image(np.asarray(image))
        image.load()
        return _flatten(image)


def resize_bicubic(image: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 uint8 array in OpenCV's BGR order: Pillow's antialiased bicubic filter,
    computed by torch's uint8 kernels (torch's antialias=True follows Pillow's filter), about twice
    as fast as Pillow's own; values differ from Pillow's by at most 1 (rounding)."""
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # 1 x 3 x H x W, channels last
    planes = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].numpy()
    return cv2.merge((planes[2], planes[1], planes[0]))  # interleaves the planes, RGB to BGR on the way


def antialias_bgr(item: Item, size: int) -> np.ndarray | None:
    """The --resize antialias image of the item (BGR); None for a dropped tile."""
    if item.dataset is None:
        image = load_image(item.source, size)
    else:
        image = to_uint8_image(read_hdf5(item))
        if item.tile and is_blank_tile(np.asarray(image)):
            return None
    if image.size == (size, size):
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    return resize_bicubic(image, size)


RESIZERS = {"reference": reference_bgr, "antialias": antialias_bgr}


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
    if not path.is_file():  # before importing Pillow: a first run needs none of it
        return False
    from PIL import Image

    from histo_retrieval.images import UNREADABLE

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != (size, size) or image.mode != "RGB":
                return False
            image.load()
        return True
    except UNREADABLE:
        return False


def save_png(bgr: np.ndarray, path: Path, compression: int | None = None) -> None:
    """Encode with OpenCV (default settings: the same bytes as the reference's cv2.imwrite), or at zlib
    `compression` 0-9; written through a temp file and a rename."""
    ok, data = cv2.imencode(".png", bgr, [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, data.tobytes())


def _unreadable() -> tuple[type[BaseException], ...]:
    """The project's errors of images that cannot be read (histo_retrieval.images.UNREADABLE) and OpenCV's;
    looked up at the first failure, as histo_retrieval.images imports Pillow, which the default path does not need."""
    from histo_retrieval.images import UNREADABLE

    return UNREADABLE + (cv2.error,)


def convert(item: Item, size: int, overwrite: bool, png_compression: int | None = None,
            resize: str = "reference", keep_truncated: bool = False) -> tuple[Item, str, str]:
    """Process one item; returns (item, status, detail) with status written, skipped, dropped or failed.

    An image that cannot be read or written fails alone and is reported at the end, as does a
    truncated file unless `keep_truncated`; a kept truncated file is written or skipped with the
    truncation as its detail. Any other exception is a bug and stops the run.
    """
    cut = None
    try:
        # Checked before the skip, so that a re-run still reports a truncated file written earlier.
        cut = truncation(item.source) if item.dataset is None else None
        if cut and not keep_truncated:
            return item, "failed", f"{cut}; left out, --keep-truncated writes it as OpenCV decodes it"
        if not overwrite and is_complete(item.output, size):
            return item, "skipped", cut or ""
        bgr = RESIZERS[resize](item, size)
        if bgr is None:
            return item, "dropped", ""
        save_png(bgr, item.output, png_compression)
        return item, "written", cut or ""
    except Exception as err:
        if not isinstance(err, _unreadable()):
            raise
        return item, "failed", f"{cut}, and {one_line(err)}" if cut else one_line(err)


@contextmanager
def _one_torch_thread(active: bool) -> Iterator[None]:
    """torch on one thread while `active` (each worker thread runs its own resize), then as before,
    so that a caller in this process (demo.py) keeps its setting."""
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_items(items: list[Item], size: int, overwrite: bool, workers: int, png_compression: int | None = None,
              resize: str = "reference", keep_truncated: bool = False) -> Iterator[tuple[Item, str, str]]:
    """convert() every item on `workers` threads; yields the results in the order of `items`."""
    def job(item: Item) -> tuple[Item, str, str]:
        return convert(item, size, overwrite, png_compression, resize, keep_truncated)

    try:
        if workers <= 1:
            yield from map(job, items)
            return
        with _one_torch_thread(resize == "antialias"):
            pool = ThreadPoolExecutor(workers, thread_name_prefix="data_process")
            try:
                yield from pool.map(job, items)
            finally:  # on Ctrl-C, drop the queued images instead of finishing them
                pool.shutdown(cancel_futures=True)
    finally:
        _close_hdf5()


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the system after every image.

    A decoded 1000x1000 patch takes 3 MB; by default glibc gives the heap back once more than twice
    that is free, so every image faulted ~1,400 fresh pages in again, about a third of the CPU time.
    Process-wide, so only the command line calls it. Pixels are unchanged; without glibc it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent from some C libraries (musl has it as a no-op)
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap, not mmap
        mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: give the heap back only above 128 MB free


def _progress(results: Iterable, total: int) -> Iterable:
    """A tqdm bar on a terminal; tqdm shows none elsewhere, so it is not even imported there."""
    if not sys.stderr.isatty():
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, unit="img")


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
    for item in sorted(done, key=lambda i: (SPLITS.index(i.split), natural_key(i.class_name),
                                            natural_key(i.output.name))):
        writer.writerow([item.describe(), item.split, item.class_name, item.output.relative_to(out).as_posix()])
    return buffer.getvalue()


def stale_outputs(out: Path, done: list[Item]) -> list[Path]:
    """Images under out/train and out/test that this run did not produce (from an earlier source)."""
    produced = {item.output for item in done}
    stale = []
    for split in SPLITS:
        root = out / split
        if root.is_dir():
            stale += [p for p in root.glob("*/*") if is_image_file(p) and p not in produced]
    return stale


# ----------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize a data set into KIMIA_data/train and KIMIA_data/test.")
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE),
                        help="RGB release folder, Kimia_Path24.h5, or a folder with train/ and test/ "
                             "(default: KIMIAPath24_RGB at the repository root)")
    parser.add_argument("--out", default=str(DATA_ROOT), help="output folder (default: the KIMIA_data folder)")
    parser.add_argument("--size", type=int, default=300, help="output side in px (default: 300)")
    parser.add_argument("--resize", choices=list(RESIZES), default="reference",
                        help="reference: the reference's pixels (cv2.imread, cv2.resize INTER_CUBIC, which aliases "
                             "fine texture when it shrinks); antialias: Pillow's antialiased bicubic filter after a "
                             "reduced-size JPEG decode, alpha over white, 16-bit rescaled (default: reference)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"threads (default: the CPUs this process may use, {default_workers()} here)")
    parser.add_argument("--png-compression", type=int, default=None, metavar="0-9",
                        help="zlib level of the PNGs; 0 (none) is the fastest, with files about 1.9x larger "
                             "(default: OpenCV's own setting, as the reference)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist (default: skip them)")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="write truncated JPEG and PNG files as OpenCV decodes them (grey where the data stops); "
                             "they are still listed at the end, with exit status 1 (default: leave them out)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="HDF5 only: side of the training tiles cut from the scans (default: the test patches' side)")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.size < 1:
        raise UserError(f"--size must be a positive number of pixels, got {args.size}")
    if args.png_compression is not None and not 0 <= args.png_compression <= 9:
        raise UserError(f"--png-compression must be 0 to 9, got {args.png_compression}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.tile_size is not None and args.tile_size < BLOCKS_PER_SIDE:
        raise UserError(f"--tile-size must be at least {BLOCKS_PER_SIDE}, got {args.tile_size}")
    if args.resize not in RESIZES:  # argparse checks the command line; this, a Namespace built in code
        raise UserError(f"--resize must be one of {', '.join(RESIZES)}, got {args.resize!r}")
    source, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    layout, items = discover(source, out, args.tile_size)
    check_plan(source, out, items)
    workers = args.workers or default_workers()
    print(f"found: {layout} at {source}; {len(items)} images to check, {workers} worker(s), "
          f"--resize {args.resize}", flush=True)

    statuses: Counter = Counter()
    done: list[Item] = []
    failures: list[tuple[Item, str]] = []
    kept_truncated: list[tuple[Item, str]] = []
    dropped: Counter = Counter()
    results = run_items(items, args.size, args.overwrite, workers, args.png_compression, args.resize,
                        args.keep_truncated)
    for item, status, detail in _progress(results, len(items)):
        statuses[status] += 1
        if status in ("written", "skipped"):
            done.append(item)
            if detail:
                kept_truncated.append((item, detail))
        elif status == "dropped":
            dropped[item.class_name] += 1
        else:
            failures.append((item, detail))

    classes = natural_sorted({item.class_name for item in items})
    counts = Counter((item.split, item.class_name) for item in done)
    print(count_table(counts, classes, dropped))
    atomic_write_text(out / "manifest.csv", manifest_text(out, done))
    record = {"command": command_line(), "source": str(source.resolve()), "layout": layout,
              "size": args.size, "resize": args.resize, "resize_method": RESIZES[args.resize],
              "png_compression": args.png_compression, "classes": classes,
              "counts": {split: {c: counts[split, c] for c in classes} for split in SPLITS},
              "failed": [item.describe() for item, _ in failures],
              "truncated": sorted(item.describe() for item, detail in failures + kept_truncated
                                  if detail.startswith("truncated:"))}
    tile_sizes = {item.tile for item in items if item.tile}
    if tile_sizes:
        record["tile_rule"] = {"tile_size": tile_sizes.pop(),
                               "white_level": WHITE_LEVEL, "blocks_per_side": BLOCKS_PER_SIDE,
                               "blank_block_fraction": BLANK_BLOCK_FRACTION, "max_blank_blocks": MAX_BLANK_BLOCKS,
                               "dropped": dict(dropped)}
    atomic_write_text(out / "data_process.json", json.dumps(record, indent=1) + "\n")
    print(f"{statuses['written']} written, {statuses['skipped']} already complete (skipped), "
          f"{sum(dropped.values())} tiles dropped, {len(failures)} failed"
          + (f", {len(kept_truncated)} truncated but kept" if kept_truncated else "")
          + f"; manifest: {out / 'manifest.csv'}")
    stale = stale_outputs(out, done)
    if stale:
        print(f"warning: {len(stale)} images under {out / 'train'} and {out / 'test'} are not from {source} "
              f"(e.g. {stale[0]}); remove them unless you mean to mix data sets", file=sys.stderr)
    if failures:
        from histo_retrieval.images import report_unreadable

        report_unreadable([(item.describe(), detail) for item, detail in failures])
    if kept_truncated:
        print(f"{len(kept_truncated)} truncated image(s) were kept as OpenCV decodes them, grey where the data "
              "stops (--keep-truncated):", file=sys.stderr)
        for item, detail in sorted(kept_truncated, key=lambda pair: pair[0].describe()):
            print(f"  {item.describe()} ({detail})", file=sys.stderr)
    return record


def command(args: argparse.Namespace) -> int:
    """The command line's main: exit status 1 when some images could not be read or were truncated
    (main lists them)."""
    record = main(args)
    return 1 if record["failed"] or record["truncated"] else 0


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(run_script(command, get_args_parser().parse_args()))
