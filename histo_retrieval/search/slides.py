"""Whole-slide images read at a physical scale: open, find the tissue, cut it into patches.

    slide = open_slide("case.svs")                     # OpenSlide, else tiffslide, else Pillow
    tiling = Tiling(mpp=0.5, patch_size=224, tissue_threshold=0.5)
    grid = tissue_grid(slide, tiling)                  # level-0 boxes of the tissue patches
    pixels = read_patch(slide, grid.read, x, y)        # patch_size x patch_size RGB, uint8

OpenSlide reads Aperio SVS, generic tiled TIFF, Hamamatsu NDPI, MIRAX MRXS and the other formats it
knows; tiffslide is the fallback for TIFF-based files when OpenSlide is missing or refuses one; a
plain image (PNG, JPEG, TIFF without a pyramid) is a slide with one level. Patches are cut from the
pyramid level nearest above the wanted resolution (the coarsest one at least as fine), then resized
to `patch_size`, so that one patch covers `patch_size * mpp` microns whatever the scanner.
"""
from __future__ import annotations

import copy
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from histo_retrieval.errors import UserError
from histo_retrieval.images import UNREADABLE

TISSUE_CELLS = 8  # thumbnail pixels along a patch's side when measuring its tissue fraction
MAX_THUMBNAIL_SIDE = 4096
DISPLAY_THUMBNAIL_SIDE = 1024
MIN_TISSUE_SATURATION = 20  # of 255: glass, pen-free background and white fat stay below it
BAND_PIXELS = 1 << 24  # level pixels read at once when making a thumbnail


class SlideError(UserError):
    """A slide that cannot be opened, has no scale, or fails while being read."""


@dataclass(frozen=True)
class Tiling:
    """How slides are cut: patches of `patch_size` pixels at `mpp` microns per pixel, kept when
    at least `tissue_threshold` of their area is tissue."""
    mpp: float = 0.5
    patch_size: int = 224
    tissue_threshold: float = 0.5

    def check(self) -> None:
        if not self.mpp > 0:
            raise UserError(f"--mpp must be positive, got {self.mpp}")
        if self.patch_size < 8:
            raise UserError(f"--patch-size must be at least 8 pixels, got {self.patch_size}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise UserError(f"--tissue-threshold is a fraction from 0 to 1, got {self.tissue_threshold}")

    def level0_size(self, slide_mpp: float) -> int:
        """The side, in level-0 pixels, of a patch of a slide scanned at `slide_mpp` microns per pixel."""
        return max(1, round(self.patch_size * self.mpp / slide_mpp))


class Slide:
    """One open slide, whichever library reads it: its levels, its scale and RGB reads.

    `mpp` is the level-0 scale from the file's metadata, or `fallback_mpp` (--slide-mpp) when the
    file has none; None when neither is known. Reads may come from several threads: OpenSlide is
    thread-safe, tiffslide and Pillow are not, so their reads take turns under the slide's lock.
    """

    def __init__(self, path: str | os.PathLike, handle: object, backend: str, fallback_mpp: float | None) -> None:
        self.path, self.handle, self.backend = os.fspath(path), handle, backend
        self._lock = None if backend == "openslide" else threading.Lock()
        self._owns_handle = True
        if backend == "image":
            self.level_dimensions: tuple[tuple[int, int], ...] = (handle.size,)
            self.level_downsamples: tuple[float, ...] = (1.0,)
            metadata_mpp = None  # a plain image's DPI field says nothing reliable about a microscope
        else:
            self.level_dimensions = tuple(tuple(map(int, size)) for size in handle.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
            metadata_mpp = _metadata_mpp(handle.properties, backend)
        self.metadata_mpp = metadata_mpp
        self.mpp = metadata_mpp or fallback_mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def is_pyramid(self) -> bool:
        """True for a whole-slide file (a format OpenSlide knows, or a TIFF with several levels)."""
        return self.backend == "openslide" or (self.backend == "tiffslide" and len(self.level_dimensions) > 1)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """height x width x 3 uint8 RGB of a region whose top-left corner is (x, y) in level-0
        pixels, read at `level`; transparent (unscanned) areas come back white, as glass."""
        if self._lock is None:
            region = self.handle.read_region((x, y), level, (width, height))
        else:
            with self._lock:
                if self.backend == "image":
                    region = self.handle.crop((x, y, x + width, y + height))
                    if region.mode != "RGB":  # kept in the file's own mode: converted region by region
                        region = region.convert("RGB")
                else:
                    region = self.handle.read_region((x, y), level, (width, height))
        if region.mode == "RGB":
            return np.array(region)
        rgba = np.asarray(region.convert("RGBA") if region.mode != "RGBA" else region)
        if rgba[..., 3].min() == 255:  # scanned everywhere: nothing to composite (most reads)
            return np.ascontiguousarray(rgba[..., :3])
        rgb, alpha = rgba[..., :3].astype(np.uint16), rgba[..., 3:].astype(np.uint16)
        return (rgb * alpha // 255 + (255 - alpha)).astype(np.uint8)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide at 1/downsample of level 0, read in bands from the finest level that is
        no coarser than that, so memory stays bounded on single-level files."""
        level = best_level(self.level_downsamples, downsample)
        width, height = self.level_dimensions[level]
        scale = self.level_downsamples[level] / downsample
        out_width, out_height = max(1, round(width * scale)), max(1, round(height * scale))
        band = max(1, BAND_PIXELS // max(1, width))
        rows = []
        for top in range(0, height, band):
            lines = min(band, height - top)
            pixels = self.read(0, round(top * self.level_downsamples[level]), level, width, lines)
            rows.append(cv2.resize(pixels, (out_width, max(1, round(lines * scale))), interpolation=cv2.INTER_AREA))
        thumbnail = np.concatenate(rows)
        if thumbnail.shape[0] != out_height:
            thumbnail = cv2.resize(thumbnail, (out_width, out_height), interpolation=cv2.INTER_AREA)
        return thumbnail

    def shared(self) -> Slide:
        """This slide for a borrower that closes what it is given: the same handle and lock, and
        a close() that leaves them open for their owner."""
        view = copy.copy(self)
        view._owns_handle = False
        return view

    def close(self) -> None:
        if self._owns_handle:
            self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SlideOpener = Callable[[str, "float | None"], Slide]  # open_slide, or a lender of slides already open


def _metadata_mpp(properties: dict, backend: str) -> float | None:
    for key in (f"{backend}.mpp-x", f"{backend}.mpp-y"):
        try:
            value = float(properties.get(key) or 0)
        except ValueError:
            continue
        if value > 0 and math.isfinite(value):
            return value
    return None


def _openslide():
    try:
        import openslide
    except (ImportError, OSError):  # no package, or its library cannot be loaded
        return None
    return openslide


def open_slide(path: str | os.PathLike, fallback_mpp: float | None = None) -> Slide:
    """The slide at `path`, through OpenSlide when it knows the format, else tiffslide for TIFFs,
    else Pillow; raises SlideError with the file's name when none can read it."""
    path = os.fspath(path)
    if not Path(path).is_file():
        raise SlideError(f"{path}: no such slide file")
    openslide = _openslide()
    reasons = []
    if openslide is not None:
        try:
            if openslide.OpenSlide.detect_format(path) is not None:
                return Slide(path, openslide.OpenSlide(path), "openslide", fallback_mpp)
        except (openslide.OpenSlideError, *UNREADABLE) as error:
            reasons.append(f"OpenSlide: {error}")
    if Path(path).suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff"):
        try:
            import tiffslide
            return Slide(path, tiffslide.TiffSlide(path), "tiffslide", fallback_mpp)
        except ImportError:
            reasons.append("tiffslide: not installed")
        except (*UNREADABLE, KeyError, IndexError, RuntimeError) as error:
            reasons.append(f"tiffslide: {error}")
    try:
        image = Image.open(path)
    except UNREADABLE as error:
        reasons.append(f"Pillow: {error}")
    else:
        try:
            image.load()  # decoded once, in its own mode: no converted copy of the whole image
            return Slide(path, image, "image", fallback_mpp)
        except UNREADABLE as error:
            image.close()
            reasons.append(f"Pillow: {error}")
    raise SlideError(f"{path}: cannot be read as a slide or an image ({'; '.join(reasons)})")


def best_level(downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest level whose downsample does not exceed `downsample` (level 0 when all do)."""
    fitting = [level for level, d in enumerate(downsamples) if d <= downsample * (1 + 1e-6)]
    return max(fitting, key=lambda level: downsamples[level]) if fitting else 0


@dataclass(frozen=True)
class ReadPlan:
    """Where a slide's patches come from: `level`, `level_size` pixels read there, covering
    `size0` level-0 pixels, resized to `patch_size`."""
    level: int
    level_size: int
    size0: int
    patch_size: int


def read_plan(slide: Slide, tiling: Tiling) -> ReadPlan:
    if slide.mpp is None:
        raise SlideError(f"{slide.path}: the file gives no scale (microns per pixel); pass it with --slide-mpp")
    size0 = tiling.level0_size(slide.mpp)
    level = best_level(slide.level_downsamples, tiling.mpp / slide.mpp)
    level_size = max(1, round(size0 / slide.level_downsamples[level]))
    return ReadPlan(level, level_size, size0, tiling.patch_size)


def read_patch(slide: Slide, plan: ReadPlan, x: int, y: int) -> np.ndarray:
    """The patch whose level-0 box starts at (x, y), at the tiling's scale and size."""
    return read_scaled(slide, plan.level, x, y, plan.size0, plan.size0, plan.patch_size, plan.patch_size)


def read_scaled(slide: Slide, level: int, x: int, y: int, width0: int, height0: int,
                out_width: int, out_height: int) -> np.ndarray:
    """The level-0 box (x, y, width0, height0) read at `level` and resized to out_width x out_height."""
    downsample = slide.level_downsamples[level]
    pixels = slide.read(x, y, level, max(1, round(width0 / downsample)), max(1, round(height0 / downsample)))
    if pixels.shape[1] == out_width and pixels.shape[0] == out_height:
        return pixels
    shrink = pixels.shape[1] > out_width
    return cv2.resize(pixels, (out_width, out_height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """True where a thumbnail shows tissue: Otsu's threshold on the saturation (glass and background
    are grey or white), never below MIN_TISSUE_SATURATION, so a slide of glass alone has none."""
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, 5) if min(saturation.shape) >= 5 else saturation
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return saturation > max(otsu, MIN_TISSUE_SATURATION)


@dataclass
class TissueGrid:
    """A slide's tissue patches: level-0 top-left corners (n x 2 int64), their tissue fractions,
    the read plan, and the thumbnail the tissue was found on with its downsample."""
    positions: np.ndarray
    tissue: np.ndarray
    read: ReadPlan
    thumbnail: np.ndarray
    thumbnail_downsample: float


def tissue_grid(slide: Slide, tiling: Tiling) -> TissueGrid:
    """Cut the slide into a grid of non-overlapping patches from its top-left corner and keep those
    whose tissue fraction reaches the threshold."""
    plan = read_plan(slide, tiling)
    width, height = slide.dimensions
    downsample = max(plan.size0 / TISSUE_CELLS, max(width, height) / MAX_THUMBNAIL_SIDE, 1.0)
    thumbnail = slide.thumbnail(downsample)
    downsample = width / thumbnail.shape[1]
    mask = tissue_mask(thumbnail).astype(np.float64)
    summed = cv2.integral(mask)  # (h+1) x (w+1): tissue in any box in four reads
    xs = np.arange(0, width - plan.size0 + 1, plan.size0)
    ys = np.arange(0, height - plan.size0 + 1, plan.size0)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    grid_x, grid_y = grid_x.ravel(), grid_y.ravel()

    def cell(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.round(values / downsample).astype(np.int64), 0, limit)

    left, right = cell(grid_x, mask.shape[1]), cell(grid_x + plan.size0, mask.shape[1])
    top, bottom = cell(grid_y, mask.shape[0]), cell(grid_y + plan.size0, mask.shape[0])
    right, bottom = np.maximum(right, left + 1).clip(max=mask.shape[1]), np.maximum(bottom, top + 1).clip(max=mask.shape[0])
    area = np.maximum((right - left) * (bottom - top), 1)
    fraction = (summed[bottom, right] - summed[top, right] - summed[bottom, left] + summed[top, left]) / area
    keep = fraction >= tiling.tissue_threshold if tiling.tissue_threshold > 0 else np.ones_like(fraction, bool)
    positions = np.stack([grid_x[keep], grid_y[keep]], axis=1).astype(np.int64)
    return TissueGrid(positions, fraction[keep].astype(np.float32), plan, thumbnail, downsample)


def display_thumbnail(thumbnail: np.ndarray, downsample: float) -> tuple[bytes, float]:
    """JPEG bytes of a thumbnail at most DISPLAY_THUMBNAIL_SIDE pixels wide or high, and its
    downsample from level 0 (for the index, the figures and the search page)."""
    scale = min(1.0, DISPLAY_THUMBNAIL_SIDE / max(thumbnail.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(thumbnail.shape[1] * scale)), max(1, round(thumbnail.shape[0] * scale)))
        small = cv2.resize(thumbnail, size, interpolation=cv2.INTER_AREA)
    else:
        small = thumbnail
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise RuntimeError("could not encode a thumbnail as JPEG")
    return encoded.tobytes(), downsample * thumbnail.shape[1] / small.shape[1]


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB pixels of JPEG bytes (a thumbnail stored in the index)."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
