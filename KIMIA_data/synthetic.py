"""A built-in, Kimia-Path24-like data set of synthetic H&E tissue.

No real data set can be downloaded here, so this generator stands in for Kimia Path24 in the tests
and the demo. Each class is one synthetic whole-slide "scan" of one tissue texture; patches are cut
from it the way Kimia Path24's were cut from its scans (docs/reproduction.md, "Data"):

- test patches come from axis-aligned squares of the scan (turned by a random quarter turn), and
  those squares are whitened in the scan written to HDF5, as in the official file;
- training patches come from the rest of the tissue, at a random position and rotation (a random
  quarter turn plus up to +-15 degrees);
- every patch gets its own stain intensity (hematoxylin and eosin amounts each scaled by 0.75-1.25).

Classes differ in structure (nucleus density, size and shape; fibre period, direction and
waviness; lumina; fat cells; gland-like rings; polygonal cells), not only in colour: the 24 classes
share 4 stain palettes, 6 classes each. Structure sizes scale with the patch size, so a patch looks
the same after data_process resizes it to 300 px whatever --patch-size was; the first 8 classes are
the most distinct ones and stay separable at 64-96 px (what the CPU demo trains on).

Writes the RGB folder release (`<out>/Training/<class>/*.jpg`, `<out>/RGBPatches-test/<class>/*.jpg`)
and, with --hdf5, the official HDF5 layout (`/scan{id}/data`, `/scan{id}/thumbnail`,
`/test_data/patches`, `/test_data/targets`). Deterministic for a given seed and settings, whatever
the number of worker processes.

    python3 KIMIA_data/synthetic.py [--out KIMIA_data/synthetic_source] [--classes 24]
        [--train-per-class 40] [--test-per-class 10] [--patch-size 320] [--scan-size S]
        [--hdf5 PATH] [--seed 0] [--contact-sheet PNG] [--workers N]

With --slides DIR it writes whole-slide images for the slide search instead (write_slide_set):
`DIR/slide_000.tif, ...`, each 1-3 boxes of known classes' tissue on near-white glass, and
`DIR/slides.json`, the classes and level-0 boxes of every slide. A slide is a pyramidal, tiled,
JPEG-compressed RGB TIFF in the Aperio SVS layout, which OpenSlide and tiffslide both open with its
scale (`openslide.mpp-x`, `tiffslide.mpp-x`). Its tissue is the patch set's, drawn so that a
REFERENCE_PATCH-px patch of the set spans REFERENCE_PATCH * PATCH_MPP microns (320 px at 0.5 um/px:
160 um); write_slide takes any boxes, scale and seed.

    python3 KIMIA_data/synthetic.py --slides DIR [--slide-count 4] [--slide-size 3072x2048]
        [--slide-mpp 0.5] [--classes 3] [--seed 0]

With --archive DIR it writes a labelled archive for whole-slide search instead (write_archive):
slides `DIR/p00_s0.tiff, ...` of several diagnoses (each a mixture of tissue classes) and patients
(each with its own stain and scanner tint, shared by its slides), and `DIR/labels.csv`
(slide,label,patient), the file `retrieve.py label` reads.

    python3 KIMIA_data/synthetic.py --archive DIR [--diagnoses 4] [--patients 12]
        [--slides-per-patient 2] [--slide-size 2048x1536] [--slide-mpp 1.0] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histo_retrieval.errors import UserError, run_script
from histo_retrieval.files import atomic_write, atomic_write_text, command_line, write_csv

DEFAULT_OUT = Path(__file__).resolve().parent / "synthetic_source"
MARKER_NAME = "synthetic.json"  # settings and file list of the last run, so a re-run may replace them
REFERENCE_PATCH = 320  # structure sizes below are in pixels of a patch this big
MAX_EXTRA_ROTATION = 15.0  # degrees, on top of a random quarter turn


# ----------------------------------------------------------------------------- tissue classes
@dataclass(frozen=True)
class Nuclei:
    """One layer of nuclei: at most one per lattice cell of `pitch` px, present with `presence`."""
    pitch: float
    presence: float
    radius: float
    elongation: float = 1.0  # major / minor axis
    along_fibres: bool = False  # orient with the fibres instead of at random
    darkness: float = 1.0


@dataclass(frozen=True)
class Fibres:
    period: float
    angle: float  # degrees
    strength: float
    waviness: float = 0.0  # amplitude in px of the sideways wave
    wave_period: float = 60.0


@dataclass(frozen=True)
class Cells:
    """A mosaic of polygonal cells (Voronoi): fat when `interior` is 0, else epithelium-like."""
    size: float
    membrane: float  # width in px
    interior: float  # eosin inside the cell
    nucleus: float = 0.0  # radius of a nucleus at the cell's seed, 0 for none


@dataclass(frozen=True)
class Holes:
    """Round white lumina, one per lattice cell at most; with `rim` > 0, gland-like rings of nuclei."""
    pitch: float
    presence: float
    radius: float
    rim: float = 0.0
    beads: int = 0  # nuclei around the ring


@dataclass(frozen=True)
class TissueClass:
    palette: int
    stroma: float  # eosin of the connective tissue
    nuclei: tuple[Nuclei, ...] = ()
    fibres: Fibres | None = None
    cells: Cells | None = None
    holes: Holes | None = None


# hematoxylin and eosin optical-density vectors (R, G, B) and gains; after Ruifrok & Johnston (2001)
PALETTES = (
    ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), 1.6, 0.9),  # classic H&E
    ((0.85, 0.55, 0.20), (0.12, 0.85, 0.35), 1.5, 0.7),  # blue hematoxylin, pale eosin
    ((0.55, 0.80, 0.35), (0.05, 0.95, 0.45), 1.8, 1.1),  # dark purple, magenta-red eosin
    ((0.60, 0.72, 0.48), (0.22, 0.88, 0.62), 1.3, 0.8),  # pale, brownish
)

# The first 8 are the most distinct structures (the demo's classes); the rest vary them, as the
# real scans of one organ do. Palettes are shared: class i uses palette i % 4.
TISSUE_CLASSES = (
    TissueClass(0, 0.25, nuclei=(Nuclei(9, 0.9, 3.2), Nuclei(13, 0.5, 3.5))),  # lymphoid
    TissueClass(1, 0.5, cells=Cells(34, 1.6, 0.55, nucleus=5.0)),  # hepatocyte plates
    TissueClass(2, 0.55, fibres=Fibres(7, 0, 0.7), nuclei=(Nuclei(22, 0.6, 2.6, 3.5, True),)),  # muscle
    TissueClass(3, 0.6, cells=Cells(70, 2.5, 0.0), nuclei=(Nuclei(45, 0.25, 3.0),)),  # fat
    TissueClass(0, 0.45, holes=Holes(110, 0.9, 24, rim=13, beads=14), nuclei=(Nuclei(30, 0.3, 2.5),)),  # glands
    TissueClass(1, 0.65, fibres=Fibres(11, 45, 0.8, 6, 60), nuclei=(Nuclei(40, 0.3, 2.5, 2.5, True),)),  # collagen
    TissueClass(2, 0.45, holes=Holes(58, 0.75, 15), nuclei=(Nuclei(16, 0.6, 3.0),)),  # lumina
    TissueClass(3, 0.4, nuclei=(Nuclei(32, 0.8, 8.0, 1.6, darkness=0.8),)),  # large pleomorphic nuclei
    TissueClass(0, 0.4, nuclei=(Nuclei(14, 0.8, 4.5),)),
    TissueClass(1, 0.6, fibres=Fibres(12, 45, 0.6)),
    TissueClass(2, 0.55, cells=Cells(42, 2.0, 0.0), nuclei=(Nuclei(18, 0.5, 3.0),)),
    TissueClass(3, 0.45, cells=Cells(50, 2.2, 0.35)),
    TissueClass(0, 0.5, holes=Holes(70, 0.85, 13, rim=9, beads=10)),
    TissueClass(1, 0.5, fibres=Fibres(8, 0, 0.6, 4, 40), nuclei=(Nuclei(12, 0.6, 2.6),)),
    TissueClass(2, 0.55, holes=Holes(100, 0.6, 30), fibres=Fibres(9, 30, 0.3)),
    TissueClass(3, 0.35, nuclei=(Nuclei(12, 0.7, 3.0),), fibres=Fibres(10, 60, 0.3)),
    TissueClass(0, 0.5, nuclei=(Nuclei(14, 0.8, 2.4, 4.0, True),), fibres=Fibres(6, 30, 0.4)),  # spindle
    TissueClass(1, 0.5, cells=Cells(60, 2.0, 0.0), nuclei=(Nuclei(10, 0.7, 3.0),)),
    TissueClass(2, 0.5, cells=Cells(28, 1.4, 0.5, nucleus=4.0), holes=Holes(90, 0.7, 18)),
    TissueClass(3, 0.55, holes=Holes(80, 0.8, 20, rim=8, beads=18), fibres=Fibres(10, 0, 0.3)),
    TissueClass(0, 0.6, fibres=Fibres(14, 0, 0.8, 10, 90)),
    TissueClass(1, 0.3, nuclei=(Nuclei(24, 0.8, 6.0, 1.3), Nuclei(10, 0.5, 2.5))),
    TissueClass(2, 0.45, nuclei=(Nuclei(20, 0.7, 4.0, 2.0),), fibres=Fibres(9, 60, 0.5, 3, 30)),
    TissueClass(3, 0.5, cells=Cells(36, 1.8, 0.45, nucleus=3.0), fibres=Fibres(8, 45, 0.25)),
)
MAX_CLASSES = len(TISSUE_CLASSES)


# ----------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A smooth random field in about [-1, 1] that varies over `scale` px."""
    step = max(int(scale), 1)
    coarse = rng.uniform(-1.0, 1.0, (h // step + 3, w // step + 3)).astype(np.float32)
    big = Image.fromarray(coarse).resize((coarse.shape[1] * step, coarse.shape[0] * step), Image.BICUBIC)
    return np.asarray(big)[step:step + h, step:step + w]


class _Lattice:
    """Per-pixel geometry of a lattice of `pitch`-px cells, in a (rows, pitch, cols, pitch) view.

    Per-cell values broadcast against that view with `cell(a)`, which avoids a per-pixel gather;
    `image(x)` turns the view back into an h x w image.
    """

    def __init__(self, h: int, w: int, pitch: float) -> None:
        self.h, self.w, self.pitch = h, w, max(int(round(pitch)), 2)
        self.rows, self.cols = -(-h // self.pitch), -(-w // self.pitch)
        local = np.arange(self.pitch, dtype=np.float32) + 0.5
        self.ly = local[None, :, None, None]
        self.lx = local[None, None, None, :]

    def cell(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, :, None]

    def image(self, view: np.ndarray) -> np.ndarray:
        full = np.broadcast_to(view, (self.rows, self.pitch, self.cols, self.pitch))
        return full.reshape(self.rows * self.pitch, self.cols * self.pitch)[:self.h, :self.w]

    def centres(self, rng: np.random.Generator, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets to one random centre per cell, kept `margin` px from the cell's edges."""
        span = max(self.pitch - 2.0 * margin, 0.0)
        low = (self.pitch - span) / 2.0
        cy = low + span * rng.random((self.rows, self.cols))
        cx = low + span * rng.random((self.rows, self.cols))
        return self.ly - self.cell(cy), self.lx - self.cell(cx)


def _soft_disc(distance: np.ndarray, edge: float = 0.25) -> np.ndarray:
    """1 inside distance < 1, 0 outside, with a soft edge; `distance` is in radii."""
    return np.clip((1.0 - distance) / edge, 0.0, 1.0)


def _render_nuclei(rng: np.random.Generator, h: int, w: int, layer: Nuclei, unit: float,
                   fibre_angle: float | None) -> np.ndarray:
    lattice = _Lattice(h, w, layer.pitch * unit)
    major = layer.radius * unit * math.sqrt(layer.elongation)
    minor = layer.radius * unit / math.sqrt(layer.elongation)
    # a margin below the radius lets nuclei cross cell edges (clipped there), hiding the lattice
    dy, dx = lattice.centres(rng, min(major + 1.0, 0.3 * lattice.pitch))
    shape = (lattice.rows, lattice.cols)
    if layer.along_fibres and fibre_angle is not None:
        angle = np.deg2rad(fibre_angle) + rng.normal(0.0, 0.15, shape)
    else:
        angle = rng.uniform(0.0, np.pi, shape)
    size = rng.uniform(0.8, 1.2, shape)
    cos, sin = lattice.cell(np.cos(angle) / size), lattice.cell(np.sin(angle) / size)
    u = (dx * cos + dy * sin) / major
    v = (dy * cos - dx * sin) / minor
    amount = (rng.random(shape) < layer.presence) * rng.uniform(0.75, 1.0, shape) * layer.darkness
    return lattice.image(_soft_disc(np.sqrt(u * u + v * v)) * lattice.cell(amount))


def _fibre_pattern(rng: np.random.Generator, h: int, w: int, fibres: Fibres, unit: float) -> np.ndarray:
    angle = np.deg2rad(fibres.angle)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    across = x * np.float32(math.cos(angle)) + y * np.float32(math.sin(angle))
    along = y * np.float32(math.cos(angle)) - x * np.float32(math.sin(angle))
    wave = fibres.waviness * unit * np.sin(along * np.float32(2 * np.pi / (fibres.wave_period * unit)))
    drift = 0.6 * fibres.period * unit * _smooth_noise(rng, h, w, 8 * fibres.period * unit)
    phase = (across + wave + drift) * np.float32(2 * np.pi / (fibres.period * unit))
    breaks = np.clip(0.6 + _smooth_noise(rng, h, w, 3 * fibres.period * unit), 0.0, 1.0)
    return ((0.5 + 0.5 * np.sin(phase)) ** 3) * breaks


def _render_cells(rng: np.random.Generator, h: int, w: int, cells: Cells, unit: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Membrane, interior and seed-nucleus maps of a Voronoi mosaic (3 x 3 neighbour search)."""
    lattice = _Lattice(h, w, cells.size * unit)
    pitch = lattice.pitch
    seeds_y = rng.uniform(0.1, 0.9, (lattice.rows + 2, lattice.cols + 2)) * pitch
    seeds_x = rng.uniform(0.1, 0.9, (lattice.rows + 2, lattice.cols + 2)) * pitch
    nearest = second = np.float32(np.inf)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            window = (slice(1 + di, 1 + di + lattice.rows), slice(1 + dj, 1 + dj + lattice.cols))
            dy = lattice.ly - lattice.cell(seeds_y[window] + di * pitch)
            dx = lattice.lx - lattice.cell(seeds_x[window] + dj * pitch)
            distance = np.sqrt(dy * dy + dx * dx)
            second = np.minimum(second, np.maximum(nearest, distance))
            nearest = np.minimum(nearest, distance)
    membrane = lattice.image(np.clip(1.0 - (second - nearest) / (cells.membrane * unit), 0.0, 1.0))
    interior = lattice.image(np.clip((second - nearest) / (2.0 * cells.membrane * unit), 0.0, 1.0))
    nucleus = lattice.image(_soft_disc(nearest / (cells.nucleus * unit))) if cells.nucleus else None
    return membrane, interior, nucleus


def _render_holes(rng: np.random.Generator, h: int, w: int, holes: Holes, unit: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lumen (1 = empty), epithelial rim and rim-nuclei maps."""
    lattice = _Lattice(h, w, holes.pitch * unit)
    shape = (lattice.rows, lattice.cols)
    outer = (holes.radius + holes.rim) * unit
    dy, dx = lattice.centres(rng, outer * 1.2 + 1.0)
    radius = lattice.cell(holes.radius * unit * rng.uniform(0.75, 1.15, shape))
    present = lattice.cell((rng.random(shape) < holes.presence).astype(np.float32))
    squash = lattice.cell(rng.uniform(0.8, 1.0, shape))
    distance = np.sqrt(dy * dy * squash + dx * dx / squash)
    lumen = lattice.image(_soft_disc(distance / radius) * present)
    if not holes.rim:
        return lumen, None, None
    rim_width = holes.rim * unit
    across_rim = (distance - radius) / rim_width  # 0 at the lumen, 1 at the outer edge
    rim = np.clip(1.0 - np.abs(across_rim - 0.5) * 2.0, 0.0, 1.0) * present
    turn = lattice.cell(rng.uniform(0, 2 * np.pi, shape))
    beads = np.clip(np.cos(np.arctan2(dy, dx) * holes.beads + turn), 0.0, 1.0) ** 2
    nuclei = np.clip(1.0 - np.abs(across_rim - 0.5) * 3.0, 0.0, 1.0) * beads * present
    return lumen, lattice.image(np.minimum(rim * 1.5, 1.0)), lattice.image(nuclei)


def render_tissue(tissue: TissueClass, h: int, w: int, unit: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin amounts (h x w float32, about 0..1.5) of one class's tissue."""
    grain = rng.uniform(0.92, 1.08, (h, w)).astype(np.float32)
    eosin = np.full((h, w), tissue.stroma, np.float32)
    eosin *= 1.0 + 0.2 * _smooth_noise(rng, h, w, 40 * unit)
    hema = np.full((h, w), 0.05, np.float32)  # the counterstain's faint background
    if tissue.fibres is not None:
        pattern = _fibre_pattern(rng, h, w, tissue.fibres, unit)
        eosin *= 1.0 - tissue.fibres.strength + 1.8 * tissue.fibres.strength * pattern
    if tissue.cells is not None:
        membrane, interior, nucleus = _render_cells(rng, h, w, tissue.cells, unit)
        eosin = eosin * (1.0 - interior) * 0.9 + tissue.cells.interior * interior + 0.8 * membrane
        if nucleus is not None:
            np.maximum(hema, nucleus, out=hema)
    for layer in tissue.nuclei:
        fibre_angle = tissue.fibres.angle if tissue.fibres is not None else None
        nuclei = _render_nuclei(rng, h, w, layer, unit, fibre_angle)
        if tissue.cells is not None and not tissue.cells.interior:
            nuclei = nuclei * membrane  # fat: nuclei only sit in the thin septa
        np.maximum(hema, nuclei, out=hema)
    if tissue.holes is not None:
        lumen, rim, rim_nuclei = _render_holes(rng, h, w, tissue.holes, unit)
        if rim is not None:
            eosin = eosin * (1.0 - rim) + 0.6 * rim
            np.maximum(hema, rim_nuclei, out=hema)
        keep = 1.0 - lumen
        eosin *= keep
        hema *= keep
    hema *= grain
    eosin *= grain
    return hema, eosin


def colorize(hema: np.ndarray, eosin: np.ndarray, palette: int, hema_gain: float = 1.0,
             eosin_gain: float = 1.0) -> np.ndarray:
    """Beer-Lambert: RGB = 255 exp(-(H h_vec + E e_vec)), as uint8."""
    h_vec, e_vec, h_scale, e_scale = PALETTES[palette]
    density = (hema[..., None] * (hema_gain * h_scale * np.asarray(h_vec, np.float32))
               + eosin[..., None] * (eosin_gain * e_scale * np.asarray(e_vec, np.float32)) + 0.03)
    return (255.0 * np.exp(-density) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- scan layout
def _inside_tissue(y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """The tissue is a wobbly rounded square; the corners of the scan are bare glass."""
    u, v = (x - size / 2) / (0.47 * size), (y - size / 2) / (0.47 * size)
    angle = np.arctan2(v, u)
    wobble = 1.0 + 0.03 * np.sin(3 * angle + 0.7) + 0.02 * np.sin(5 * angle + 2.1)
    return (np.abs(u) ** 4 + np.abs(v) ** 4) ** 0.25 < wobble


@dataclass
class ScanLayout:
    size: int
    patch: int
    test_corners: list[tuple[int, int]]  # top-left (y, x) of each test square
    train_area: np.ndarray = field(repr=False)  # (k, 2) candidate training-patch centres


def plan_scan(size: int, patch: int, test_count: int) -> ScanLayout | None:
    """Test squares fill lattice cells from the bottom of the tissue up; training patches (any
    rotation, so a circle of radius patch/sqrt(2)) come from the tissue left above them.
    None if the scan is too small for that."""
    pitch = patch + patch // 8
    rows, cols = size // pitch, size // pitch
    offset = (size - np.array([rows, cols]) * pitch) // 2 + patch // 16  # not aligned with tiles
    corners = []
    for r in range(rows - 1, -1, -1):
        for c in range(cols):
            y, x = offset[0] + r * pitch, offset[1] + c * pitch
            ys, xs = np.array([y, y, y + patch, y + patch]), np.array([x, x + patch, x, x + patch])
            if len(corners) < test_count and _inside_tissue(ys, xs, size).all():
                corners.append((int(y), int(x)))
    if len(corners) < test_count:
        return None
    radius = patch / math.sqrt(2) + 2
    step = max(patch // 16, 1)
    cy, cx = np.meshgrid(np.arange(radius, size - radius, step), np.arange(radius, size - radius, step),
                         indexing="ij")
    cy, cx = cy.ravel(), cx.ravel()
    around = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ok = _inside_tissue(cy[:, None] + radius * np.sin(around), cx[:, None] + radius * np.cos(around),
                        size).all(axis=1)
    half = patch / 2
    for y, x in corners:
        gap_y = np.maximum(np.abs(cy - (y + half)) - half, 0)
        gap_x = np.maximum(np.abs(cx - (x + half)) - half, 0)
        ok &= np.hypot(gap_y, gap_x) > radius
    if ok.sum() < 16:  # too little room: training patches would nearly repeat
        return None
    return ScanLayout(size, patch, corners, np.stack([cy[ok], cx[ok]], axis=1))


def auto_scan_size(patch: int, test_count: int) -> int:
    """The smallest scan (in steps of patch/4) that holds the test squares and a training area."""
    size = 2 * patch
    while plan_scan(size, patch, test_count) is None:
        size += max(patch // 4, 1)
    return size


# ----------------------------------------------------------------------------- one class
@dataclass(frozen=True)
class Settings:
    out_dir: str
    num_classes: int
    patch_size: int
    train_per_class: int
    test_per_class: int
    scan_size: int
    seed: int
    want_scan: bool
    thumbnails: int


def _stain_gains(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(0.75, 1.25)), float(rng.uniform(0.75, 1.25))


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=92))


def make_class(settings: Settings, index: int) -> dict:
    """Render class `index`'s scan, write its patches, and return what the HDF5 file and the contact
    sheet need. Seeded by (seed, index) alone, so workers may run classes in any order."""
    rng = np.random.default_rng([settings.seed, index])
    tissue = TISSUE_CLASSES[index]
    name = f"s{index}"
    patch, size = settings.patch_size, settings.scan_size
    layout = plan_scan(size, patch, settings.test_per_class)
    unit = patch / REFERENCE_PATCH
    hema, eosin = render_tissue(tissue, size, size, unit, rng)
    out = Path(settings.out_dir)
    written = []

    tests = []
    for k, (y, x) in enumerate(layout.test_corners):
        window = (slice(y, y + patch), slice(x, x + patch))
        rgb = colorize(hema[window], eosin[window], tissue.palette, *_stain_gains(rng))
        rgb = np.ascontiguousarray(np.rot90(rgb, int(rng.integers(4))))
        tests.append(rgb)
        path = out / "RGBPatches-test" / name / f"test_{k}.jpg"
        _save_jpeg(rgb, path)
        written.append(path)

    thumbnails = []
    tilt = math.radians(MAX_EXTRA_ROTATION)
    reach = int(math.ceil(patch / 2 * (math.cos(tilt) + math.sin(tilt)))) + 3  # half a window the turn fits in
    picks = rng.choice(len(layout.train_area), settings.train_per_class,
                       replace=settings.train_per_class > len(layout.train_area))
    for k, pick in enumerate(picks):
        cy, cx = (int(round(c)) for c in layout.train_area[pick])
        window = (slice(max(cy - reach, 0), cy + reach), slice(max(cx - reach, 0), cx + reach))
        region = Image.fromarray(colorize(hema[window], eosin[window], tissue.palette, *_stain_gains(rng)))
        angle = rng.uniform(-MAX_EXTRA_ROTATION, MAX_EXTRA_ROTATION)
        region = region.rotate(angle, resample=Image.BICUBIC,
                               center=(cx - window[1].start, cy - window[0].start))
        left, top = cx - window[1].start - patch // 2, cy - window[0].start - patch // 2
        rgb = np.asarray(region.crop((left, top, left + patch, top + patch)))
        rgb = np.ascontiguousarray(np.rot90(rgb, int(rng.integers(4))))
        path = out / "Training" / name / f"train_{k}.jpg"
        _save_jpeg(rgb, path)
        written.append(path)
        if k < settings.thumbnails:
            thumbnails.append(rgb)

    scan = None
    if settings.want_scan:
        glass = ~_inside_tissue(np.arange(size)[:, None], np.arange(size)[None, :], size)
        hema[glass] = 0.0
        eosin[glass] = 0.0
        scan = colorize(hema, eosin, tissue.palette)
        for y, x in layout.test_corners:
            scan[y:y + patch, x:x + patch] = 255  # whitened test regions, as in the official file
    return {"index": index, "files": [str(p) for p in written], "tests": tests, "scan": scan,
            "thumbnails": thumbnails}


# ----------------------------------------------------------------------------- outputs
def write_hdf5(path: str | os.PathLike, scans: list[np.ndarray], test_patches: list[np.ndarray],
               test_targets: list[int], grayscale: bool = False) -> None:
    """The official Kimia_Path24.h5 layout (docs/reproduction.md, "Data"): `/scan{id}/data`,
    `/scan{id}/thumbnail`, `/test_data/patches` (n x P x P[ x 3]) and `/test_data/targets`.
    `grayscale` drops the channel axis, as some copies of the official file have it."""
    import h5py

    def gray(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).convert("L")) if grayscale else image

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            for scan_id, scan in enumerate(scans):
                scan = gray(scan)
                chunk = (min(256, scan.shape[0]), min(256, scan.shape[1])) + scan.shape[2:]
                group = f.create_group(f"scan{scan_id}")
                group.create_dataset("data", data=scan, chunks=chunk, compression="gzip", compression_opts=1)
                step = max(scan.shape[0] // 64, 1)
                group.create_dataset("thumbnail", data=scan[::step, ::step])
            patches = np.stack([gray(p) for p in test_patches])
            f.create_dataset("test_data/patches", data=patches, chunks=(1,) + patches.shape[1:],
                             compression="gzip", compression_opts=1)
            f.create_dataset("test_data/targets", data=np.asarray(test_targets, np.int64))

    atomic_write(path, write)


def contact_sheet(thumbnails: list[list[np.ndarray]], path: str | os.PathLike, tile: int = 80,
                  classes_per_row: int = 4) -> None:
    """A PNG with a few patches of every class, labelled s0, s1, ..."""
    per_class = max(len(t) for t in thumbnails)
    label_height, gap = 14, 8
    block_w, block_h = per_class * tile + gap, tile + label_height + gap
    rows = -(-len(thumbnails) // classes_per_row)
    sheet = Image.new("RGB", (min(len(thumbnails), classes_per_row) * block_w + gap, rows * block_h + gap),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for index, patches in enumerate(thumbnails):
        left = gap + (index % classes_per_row) * block_w
        top = gap + (index // classes_per_row) * block_h
        draw.text((left, top), f"s{index} (palette {TISSUE_CLASSES[index].palette})", fill="black")
        for k, patch in enumerate(patches):
            small = Image.fromarray(patch).resize((tile, tile), Image.BICUBIC)
            sheet.paste(small, (left + k * tile, top + label_height))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))


def _replace_previous_run(out: Path) -> None:
    """Remove the files a previous run listed in its marker; refuse a non-empty folder without one,
    since it may hold real data."""
    marker = out / MARKER_NAME
    if marker.exists():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        for name in previous.get("files", []):
            (out / name).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder is not empty and was not made by synthetic.py; "
                              "choose a new or empty folder")


def make_rgb_release(out_dir: str | os.PathLike, num_classes: int = MAX_CLASSES, patch_size: int = 320,
                     train_per_class: int = 40, test_per_class: int = 10, seed: int = 0,
                     scan_size: int | None = None, hdf5: str | os.PathLike | None = None,
                     contact_sheet_path: str | os.PathLike | None = None, workers: int | None = None,
                     thumbnails_per_class: int = 3) -> dict:
    """Write the synthetic RGB folder release under `out_dir` (and the HDF5 form if `hdf5`).

    Returns the settings written to `out_dir/synthetic.json`.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, got {num_classes}")
    if patch_size < 16:
        raise UserError(f"--patch-size must be at least 16, got {patch_size}")
    if train_per_class < 1 or test_per_class < 1:
        raise UserError("--train-per-class and --test-per-class must be at least 1")
    if scan_size is None:
        scan_size = auto_scan_size(patch_size, test_per_class)
    elif plan_scan(scan_size, patch_size, test_per_class) is None:
        raise UserError(f"--scan-size {scan_size} is too small for {test_per_class} test patches of "
                              f"{patch_size} px plus a training area; use at least "
                              f"{auto_scan_size(patch_size, test_per_class)} or leave it out")
    out = Path(out_dir)
    _replace_previous_run(out)
    settings = Settings(str(out), num_classes, patch_size, train_per_class, test_per_class, scan_size, seed,
                        want_scan=hdf5 is not None,
                        thumbnails=thumbnails_per_class if contact_sheet_path is not None else 0)
    workers = min(workers or os.cpu_count() or 1, num_classes)
    jobs = [(settings, i) for i in range(num_classes)]
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.starmap(make_class, jobs, chunksize=1)
    else:
        results = [make_class(*job) for job in jobs]

    if hdf5 is not None:
        write_hdf5(hdf5, [r["scan"] for r in results], [p for r in results for p in r["tests"]],
                   [r["index"] for r in results for _ in r["tests"]])
    if contact_sheet_path is not None:
        contact_sheet([r["thumbnails"] for r in results], contact_sheet_path)
    record = {key: value for key, value in vars(settings).items() if key not in ("want_scan", "thumbnails")}
    record.update(command=command_line(), classes=[f"s{i}" for i in range(num_classes)],
                  hdf5=None if hdf5 is None else str(hdf5),
                  files=[os.path.relpath(f, out) for r in results for f in r["files"]])
    atomic_write_text(out / MARKER_NAME, json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------- whole slides
SLIDE_MARKER_NAME = "slides.json"  # the regions of every slide write_slide_set wrote
SLIDE_SET_FILE = re.compile(r"\.?(slide_\d{3,}\.tif|slides\.json)(\..+\.tmp)?")  # or atomic_write's temp file
PATCH_MPP = 0.5  # microns per pixel the patch set's REFERENCE_PATCH-px patches are drawn at on a slide
SLIDE_COMPRESSIONS = ("jpeg", "deflate")
MIN_SLIDE_SIDE = 256
GLASS_GREY = 245  # mean grey of the bare glass; +-3 slow shading and +-2 per-pixel noise around it
SLIDE_TOP_LEVEL = 1024  # without `levels`, halve until the largest side is below this
THUMBNAIL_SIDE = 768  # the largest side of the thumbnail page
DEFAULT_SLIDE_COUNT, DEFAULT_SLIDE_CLASSES, DEFAULT_SLIDE_SIZE, DEFAULT_SLIDE_MPP = 4, 3, (3072, 2048), 0.5


def slide_unit(mpp: float, patch_mpp: float = PATCH_MPP) -> float:
    """The `unit` (structure scale of render_tissue) of a slide at `mpp`: its tissue looks like the
    patch set's when a REFERENCE_PATCH-px patch of the set is taken to span REFERENCE_PATCH *
    patch_mpp microns (160 um at the default 0.5; 500 um, as a Kimia Path24 patch, at 1.5625)."""
    return patch_mpp / mpp


def _glass(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Bare glass: near-white grey with a slow shading and a little per-channel pixel noise, so its
    saturation stays near 0 (uint8 wrap-around arithmetic keeps this cheap on big slides)."""
    shade = _smooth_noise(rng, height, width, 512.0)
    base = (GLASS_GREY + 0.5 + 3.0 * shade).astype(np.uint8)
    noise = rng.integers(-2, 3, (height, width, 3), dtype=np.int8).view(np.uint8)
    return np.add(noise, base[..., None], dtype=np.uint8)  # never wraps: 245 +- 5 stays in 0..255


def _region_alpha(rng: np.random.Generator, h: int, w: int, unit: float) -> np.ndarray:
    """Tissue cover of a box: 1 inside, 0 on glass; a rounded outline pulled in by up to `margin` px
    along a smooth random wobble, with an edge a couple of pixels soft."""
    margin = min(0.1 * min(h, w), 48.0 * unit)
    corner = 0.5 * margin + 0.05 * min(h, w)
    ey = np.minimum(np.arange(h, dtype=np.float32) + 0.5, h - 0.5 - np.arange(h, dtype=np.float32))
    ex = np.minimum(np.arange(w, dtype=np.float32) + 0.5, w - 0.5 - np.arange(w, dtype=np.float32))
    qy, qx = (corner - ey)[:, None], (corner - ex)[None, :]
    inside = corner - np.hypot(np.maximum(qy, 0), np.maximum(qx, 0)) - np.minimum(np.maximum(qy, qx), 0)
    pull = margin * (0.5 + 0.5 * _smooth_noise(rng, h, w, max(min(h, w) / 5.0, 8.0)))
    return np.clip((inside - pull) / (2.0 * unit), 0.0, 1.0)


def _check_slide_settings(size: tuple[int, int], mpp: float, tile: int, levels: int | None,
                          compression: str, patch_mpp: float) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if min(width, height) < MIN_SLIDE_SIDE:
        raise UserError(f"--slide-size {width}x{height}: both sides must be at least {MIN_SLIDE_SIDE} px")
    if not (math.isfinite(mpp) and mpp > 0):
        raise UserError(f"--slide-mpp must be a positive number of microns per pixel, got {mpp}")
    if not (math.isfinite(patch_mpp) and patch_mpp > 0):
        raise UserError(f"patch_mpp must be a positive number of microns per pixel, got {patch_mpp}")
    if tile < 16 or tile % 16:
        raise UserError(f"tile must be a multiple of 16 px (TIFF tiles), got {tile}")
    if levels is not None and not (1 <= levels and min(width, height) >> (levels - 1) >= 1):
        raise UserError(f"levels must be from 1 to {min(width, height).bit_length()} for a "
                        f"{width}x{height} slide, got {levels}")
    if compression not in SLIDE_COMPRESSIONS:
        raise UserError(f"compression must be one of {', '.join(SLIDE_COMPRESSIONS)}, got {compression!r}")
    return width, height


def _pyramid(level0: np.ndarray, levels: int | None) -> list[np.ndarray]:
    """Level 0 and its 2x reductions (each the area average of the one above)."""
    import cv2

    pyramid = [level0]
    while (len(pyramid) < levels) if levels is not None else (max(pyramid[-1].shape[:2]) >= SLIDE_TOP_LEVEL):
        above = pyramid[-1]
        size = (max(above.shape[1] // 2, 1), max(above.shape[0] // 2, 1))
        pyramid.append(cv2.resize(above, size, interpolation=cv2.INTER_AREA))
    return pyramid


def _write_svs(path: str, pyramid: list[np.ndarray], mpp: float, tile: int, compression: str) -> None:
    """An Aperio-SVS-like TIFF, the layout both OpenSlide and tiffslide read with its scale: level 0
    tiled, whose ImageDescription starts "Aperio Image Library" and holds "|MPP = ...", then a
    stripped thumbnail page, then the reduced levels, tiled (SubfileType 0, as Aperio writes them).
    XResolution / YResolution carry the same scale in pixels per centimetre for other readers."""
    import cv2
    import tifffile

    height, width = pyramid[0].shape[:2]
    codec = "JPEG/RGB Q=90" if compression == "jpeg" else "Deflate/RGB"
    head = "Aperio Image Library v12.0.0 (synthetic: KIMIA_data/synthetic.py)\r\n"
    options = {"photometric": "rgb", "compression": "jpeg" if compression == "jpeg" else "zlib",
               "compressionargs": {"level": 90 if compression == "jpeg" else 6}, "resolutionunit": "CENTIMETER",
               "metadata": None}  # None: no second ImageDescription (tifffile's JSON) to hide Aperio's

    def resolution(downsample: float) -> tuple[float, float]:
        return (1e4 / (mpp * downsample),) * 2

    shrink = max(width, height) / THUMBNAIL_SIDE
    thumbnail = pyramid[0]
    if shrink > 1:  # from the smallest level still at least as big
        source = next((level for level in reversed(pyramid) if max(level.shape[:2]) >= THUMBNAIL_SIDE), pyramid[0])
        thumb_size = (max(round(width / shrink), 1), max(round(height / shrink), 1))
        thumbnail = cv2.resize(source, thumb_size, interpolation=cv2.INTER_AREA)
    bigtiff = sum(level.nbytes for level in pyramid) > 2 ** 31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tiff:
        tiff.write(pyramid[0], tile=(tile, tile), resolution=resolution(1.0), **options,
                   description=(f"{head}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) {codec}"
                                f"|AppMag = {10.0 / mpp:g}|MPP = {float(mpp)!r}"))
        tiff.write(thumbnail, resolution=resolution(width / thumbnail.shape[1]), **options,
                   description=f"{head}{width}x{height} -> {thumbnail.shape[1]}x{thumbnail.shape[0]} - ")
        for level in pyramid[1:]:
            tiff.write(level, tile=(tile, tile), resolution=resolution(width / level.shape[1]), **options,
                       description=(f"{head}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) -> "
                                    f"{level.shape[1]}x{level.shape[0]} {codec}"))


def write_slide(path: str | os.PathLike, regions: list[tuple[int, int, int, int, int]],
                size: tuple[int, int] = (3072, 2048), mpp: float = 0.5, tile: int = 256, seed: int = 0,
                levels: int | None = None, compression: str = "jpeg", patch_mpp: float = PATCH_MPP,
                stain: tuple[float, float] | None = None, tint: tuple[float, float, float] | None = None) -> dict:
    """Write a synthetic whole-slide image: glass with boxes of tissue of known classes.

    `regions` are (class_index, x, y, w, h) boxes in level-0 pixels, inside the slide; each is
    filled with that class's tissue (render_tissue and colorize, at slide_unit(mpp, patch_mpp) and
    one random stain intensity per box, as a patch of the set gets), inside a ragged rounded outline
    that leaves glass in a margin of at most 10% of the box's shorter side; a later box lies over an
    earlier one. The file is a pyramidal tiled RGB TIFF in the Aperio SVS layout (see _write_svs),
    `tile` px tiles, JPEG (quality 90) or deflate, levels 2x apart down to a largest side below
    1024 px unless `levels` (the count, level 0 included) says otherwise. Deterministic for a seed;
    written atomically. Level 0 is built in memory (3 bytes a pixel).

    `stain` (hematoxylin and eosin gains, as a patient's lab stains) replaces each box's own gains
    (0.75-1.25 each) by these within +-5%; `tint` (R, G, B factors, as a scanner's colour response)
    multiplies the tissue's colour. Glass stays as it is: scanners white-balance on it.

    Returns {"path", "size": [w, h], "mpp", "unit", "patch_mpp", "seed", "level_dimensions",
    "regions": [{"class", "class_index", "x", "y", "w", "h"}]}.
    """
    mpp, patch_mpp = float(mpp), float(patch_mpp)
    width, height = _check_slide_settings(size, mpp, tile, levels, compression, patch_mpp)
    boxes = []
    for region in regions:
        if len(region) != 5:
            raise UserError(f"a slide region is (class_index, x, y, w, h), got {region!r}")
        index, x, y, w, h = (int(v) for v in region)
        if not 0 <= index < MAX_CLASSES:
            raise UserError(f"region {region!r}: class index must be from 0 to {MAX_CLASSES - 1}")
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise UserError(f"region {region!r}: the box must lie inside the {width}x{height} slide")
        boxes.append((index, x, y, w, h))
    unit = slide_unit(mpp, patch_mpp)
    image = _glass(np.random.default_rng([seed, 0]), height, width)
    for k, (index, x, y, w, h) in enumerate(boxes, start=1):
        rng = np.random.default_rng([seed, k])
        tissue = TISSUE_CLASSES[index]
        hema, eosin = render_tissue(tissue, h, w, unit, rng)
        gains = _stain_gains(rng)  # drawn even with `stain`, so the rest of the stream is the same
        if stain is not None:
            gains = tuple(float(g) * (1.0 + (own - 1.0) / 5.0) for g, own in zip(stain, gains))
        rgb = colorize(hema, eosin, tissue.palette, *gains).astype(np.float32)
        if tint is not None:
            rgb *= np.asarray(tint, np.float32)
        alpha = _region_alpha(rng, h, w, unit)[..., None]
        window = image[y:y + h, x:x + w]
        window[:] = (window + alpha * (rgb - window) + 0.5).astype(np.uint8)
        del hema, eosin, rgb, alpha
    pyramid = _pyramid(image, levels)
    atomic_write(path, lambda tmp: _write_svs(tmp, pyramid, mpp, tile, compression))
    return {"path": os.fspath(path), "size": [width, height], "mpp": mpp, "unit": unit,
            "patch_mpp": patch_mpp, "seed": seed,
            "level_dimensions": [[level.shape[1], level.shape[0]] for level in pyramid],
            "regions": [{"class": f"s{index}", "class_index": index, "x": x, "y": y, "w": w, "h": h}
                        for index, x, y, w, h in boxes]}


def plan_slide_regions(rng: np.random.Generator, size: tuple[int, int], classes: list[int], unit: float
                       ) -> list[tuple[int, int, int, int, int]]:
    """Boxes for one slide, one per class in `classes` while they fit: sides from about two patch
    fields (2 * REFERENCE_PATCH * unit px) to 45% of the slide's shorter side, at least a twentieth of
    that side apart from each other and from the slide's edge; at least the first always fits."""
    width, height = size
    short = min(width, height)
    low = int(min(2 * REFERENCE_PATCH * unit, 0.4 * short))
    high = int(max(low, 0.45 * short))
    gap = short // 20
    boxes: list[tuple[int, int, int, int, int]] = []
    for index in classes:
        for _ in range(200):
            w, h = (int(v) for v in rng.integers(low, high + 1, 2))
            w, h = min(w, width - 2 * gap), min(h, height - 2 * gap)
            x = int(rng.integers(gap, width - gap - w + 1))
            y = int(rng.integers(gap, height - gap - h + 1))
            if all(x + w + gap <= bx or bx + bw + gap <= x or y + h + gap <= by or by + bh + gap <= y
                   for _, bx, by, bw, bh in boxes):
                boxes.append((index, x, y, w, h))
                break
    return boxes


def write_slide_set(out_dir: str | os.PathLike, count: int = 4, classes: int = 3,
                    size: tuple[int, int] = (3072, 2048), mpp: float = 0.5, seed: int = 0,
                    compression: str = "jpeg") -> list[dict]:
    """Write `count` slides `out_dir/slide_000.tif, ...`, each with 1-3 tissue boxes of classes s0 ...
    s{classes-1} on glass (slide k's first box is class k % classes, so every class appears once
    count >= classes; slide k asks for k % 3 more boxes, of other classes drawn at random as the layouts
    are, and gets those that fit), and `out_dir/slides.json`:
    the returned list, one write_slide record per slide plus "file", its name in `out_dir`.
    A re-run replaces an earlier set; a folder holding any other file is refused."""
    if count < 1:
        raise UserError(f"--slide-count must be at least 1, got {count}")
    if not 1 <= classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, got {classes}")
    mpp = float(mpp)
    width, height = _check_slide_settings(size, mpp, 256, None, compression, PATCH_MPP)
    out = Path(out_dir)
    if out.exists():  # replace an earlier set (even one cut short), never anything else
        ours = [p for p in out.iterdir() if p.is_file() and SLIDE_SET_FILE.fullmatch(p.name)]
        if len(ours) < len(list(out.iterdir())):
            raise UserError(f"--slides {out}: the folder holds files other than slide_NNN.tif and "
                            f"{SLIDE_MARKER_NAME}; choose a new or empty folder")
        for path in ours:
            path.unlink()
    records = []
    for k in range(count):
        rng = np.random.default_rng([seed, 1_000_003, k])  # the layout's stream, apart from write_slide's
        others = rng.permutation([c for c in range(classes) if c != k % classes])[:k % 3]
        regions = plan_slide_regions(rng, (width, height), [k % classes, *map(int, others)], slide_unit(mpp))
        name = f"slide_{k:03d}.tif"
        slide_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        record = write_slide(out / name, regions, (width, height), mpp, seed=slide_seed, compression=compression)
        records.append({"file": name, **record})
    atomic_write_text(out / SLIDE_MARKER_NAME, json.dumps(records, indent=1) + "\n")
    return records


def parse_slide_size(text: str) -> tuple[int, int]:
    """"3072x2048" -> (3072, 2048)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--slide-size must be WIDTHxHEIGHT in pixels, like 3072x2048, got {text!r}")
    return int(parts[0]), int(parts[1])


# ----------------------------------------------------------------------------- labelled archive
ARCHIVE_LABELS_NAME = "labels.csv"  # slide,label,patient: what `retrieve.py label` reads
ARCHIVE_MARKER_NAME = "archive.json"  # settings, mixtures and every slide's record
ARCHIVE_FILE = re.compile(r"\.?(p\d{2,}_s\d+\.tiff|labels\.csv|archive\.json)(\..+\.tmp)?")
DEFAULT_DIAGNOSES, DEFAULT_PATIENTS, DEFAULT_SLIDES_PER_PATIENT = 4, 12, 2
DEFAULT_ARCHIVE_SIZE, DEFAULT_ARCHIVE_MPP = (2048, 1536), 1.0
SHARED_CLASSES = 2  # classes every diagnosis holds some of, besides its own and its neighbour's
MAX_DIAGNOSES = MAX_CLASSES - SHARED_CLASSES
ARCHIVE_BOXES = (2, 4)  # tissue pieces per slide, fewest and most (those that fit)


def diagnosis_mixtures(diagnoses: int, seed: int = 0) -> list[dict[int, float]]:
    """Each diagnosis's share of each tissue class (class index -> weight, summing to 1): its own
    class d (0.4-0.55), the next diagnosis's own class (0.1-0.2) and the SHARED_CLASSES classes
    numbered from `diagnoses` up (the rest, split at random), so classes are shared across diagnoses
    in different proportions. Deterministic for a seed."""
    rng = np.random.default_rng([seed, 2_000_029])
    mixtures = []
    for d in range(diagnoses):
        own, neighbour = rng.uniform(0.4, 0.55), rng.uniform(0.1, 0.2)
        shared = (1.0 - own - neighbour) * rng.dirichlet(np.ones(SHARED_CLASSES))
        weights = {d: float(own)}
        weights[(d + 1) % diagnoses] = weights.get((d + 1) % diagnoses, 0.0) + float(neighbour)
        weights.update({diagnoses + j: float(w) for j, w in enumerate(shared)})
        mixtures.append(weights)
    return mixtures


def _archive_settings(diagnoses: int, patients: int, slides_per_patient: int) -> None:
    if not 2 <= diagnoses <= MAX_DIAGNOSES:
        raise UserError(f"--diagnoses must be from 2 to {MAX_DIAGNOSES}, got {diagnoses}")
    if patients < diagnoses:
        raise UserError(f"--patients {patients} is fewer than --diagnoses {diagnoses}: every diagnosis "
                        f"needs a patient; use at least {diagnoses} patients")
    if slides_per_patient < 1:
        raise UserError(f"--slides-per-patient must be at least 1, got {slides_per_patient}")


def write_archive(out_dir: str | os.PathLike, diagnoses: int = DEFAULT_DIAGNOSES, patients: int = DEFAULT_PATIENTS,
                  slides_per_patient: int = DEFAULT_SLIDES_PER_PATIENT,
                  size: tuple[int, int] = DEFAULT_ARCHIVE_SIZE, mpp: float = DEFAULT_ARCHIVE_MPP, seed: int = 0,
                  compression: str = "jpeg") -> dict:
    """Write a labelled archive for whole-slide search: `out_dir/p00_s0.tiff, ...` (patient p00's
    slides s0, s1, ...), `out_dir/labels.csv` (columns slide,label,patient: the file name, its
    diagnosis d0, d1, ... and its patient) and `out_dir/archive.json` (command, settings, mixtures,
    and every slide's write_slide record with its label, patient, stain and tint).

    - Diagnoses: each is a mixture of tissue classes (diagnosis_mixtures). A slide has 2-4 tissue
      pieces (those that fit, plan_slide_regions): the first of its diagnosis's own class, the others
      drawn from the mixture.
    - Patients: diagnoses are dealt round-robin, then shuffled by the seed, so each has
      patients // diagnoses or one more. A patient's stain (hematoxylin and eosin gains, 0.75-1.25
      each) and scanner tint (R, G, B factors, 0.9-1.0 each) are drawn once and shared by all its
      slides (write_slide's `stain` and `tint`): its slides look alike beyond their diagnosis.
    - Slides: each side drawn from half to all of `size` (level 0, multiples of 16, at least
      MIN_SLIDE_SIDE px), at `mpp`; the layout, and so the amount of glass, differs per slide.

    Deterministic for a seed. A re-run replaces an earlier archive; a folder holding any other file
    is refused. Returns the record written to archive.json."""
    _archive_settings(diagnoses, patients, slides_per_patient)
    mpp = float(mpp)
    width, height = _check_slide_settings(size, mpp, 256, None, compression, PATCH_MPP)
    out = Path(out_dir)
    if out.exists():  # replace an earlier archive (even one cut short), never anything else
        entries = list(out.iterdir())
        ours = [p for p in entries if p.is_file() and ARCHIVE_FILE.fullmatch(p.name)]
        if len(ours) < len(entries):
            raise UserError(f"--archive {out}: the folder holds files other than pNN_sN.tiff, "
                            f"{ARCHIVE_LABELS_NAME} and {ARCHIVE_MARKER_NAME}; choose a new or empty folder")
        for path in ours:
            path.unlink()
    mixtures = diagnosis_mixtures(diagnoses, seed)
    dealt = np.random.default_rng([seed, 2_000_011]).permutation(np.arange(patients) % diagnoses)
    digits = max(2, len(str(patients - 1)))
    unit = slide_unit(mpp)
    slides, rows = [], []
    for p, diagnosis in enumerate(int(d) for d in dealt):
        patient, label = f"p{p:0{digits}d}", f"d{diagnosis}"
        rng = np.random.default_rng([seed, 2_000_003, p])  # the patient's stream: stain, tint, slides
        stain = tuple(float(g) for g in rng.uniform(0.75, 1.25, 2))
        tint = tuple(float(t) for t in rng.uniform(0.9, 1.0, 3))
        classes, weights = zip(*sorted(mixtures[diagnosis].items()))
        for k in range(slides_per_patient):
            layout = np.random.default_rng([seed, 2_000_003, p, 1 + k])
            slide_size = tuple(max(MIN_SLIDE_SIDE, int(layout.uniform(0.5, 1.0) * side) // 16 * 16)
                               for side in (width, height))
            pieces = int(layout.integers(ARCHIVE_BOXES[0], ARCHIVE_BOXES[1] + 1))
            drawn = layout.choice(classes, pieces - 1, p=np.asarray(weights) / sum(weights))
            regions = plan_slide_regions(layout, slide_size, [diagnosis, *map(int, drawn)], unit)
            name = f"{patient}_s{k}.tiff"
            slide_seed = int(np.random.SeedSequence([seed, 2_000_003, p, k]).generate_state(1)[0])
            record = write_slide(out / name, regions, slide_size, mpp, seed=slide_seed, compression=compression,
                                 stain=stain, tint=tint)
            slides.append({"file": name, "label": label, "patient": patient, "stain": list(stain),
                           "tint": list(tint), **record})
            rows.append({"slide": name, "label": label, "patient": patient})
    write_csv(rows, out / ARCHIVE_LABELS_NAME, ["slide", "label", "patient"])
    record = {"command": command_line(), "seed": seed, "diagnoses": diagnoses, "patients": patients,
              "slides_per_patient": slides_per_patient, "size": [width, height], "mpp": mpp,
              "mixtures": {f"d{d}": {f"s{c}": w for c, w in sorted(m.items())} for d, m in enumerate(mixtures)},
              "slides": slides}
    atomic_write_text(out / ARCHIVE_MARKER_NAME, json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate a synthetic Kimia-Path24-like data set.")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the RGB release (default: KIMIA_data/synthetic_source)")
    parser.add_argument("--classes", type=int, default=None,
                        help=f"number of classes s0, s1, ... (default: {MAX_CLASSES}, the most; "
                             f"{DEFAULT_SLIDE_CLASSES} with --slides)")
    parser.add_argument("--train-per-class", type=int, default=40, help="training patches per class (default: 40)")
    parser.add_argument("--test-per-class", type=int, default=10, help="test patches per class (default: 10)")
    parser.add_argument("--patch-size", type=int, default=320,
                        help="patch side in px (default: 320; Kimia Path24's are 1000)")
    parser.add_argument("--scan-size", type=int, default=None,
                        help="scan side in px (default: the smallest that fits the test patches)")
    parser.add_argument("--hdf5", default=None,
                        help="also write the official HDF5 layout to this file (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--contact-sheet", default=None,
                        help="also write a PNG with a few patches per class (default: none)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    slides = parser.add_argument_group("whole slides (instead of the patch set)")
    slides.add_argument("--slides", default=None, metavar="DIR",
                        help="write synthetic whole-slide images DIR/slide_000.tif, ... and DIR/slides.json "
                             "instead of the patch set; only --classes and --seed of the flags above apply "
                             "(default: none, write the patch set)")
    slides.add_argument("--archive", default=None, metavar="DIR",
                        help="write a labelled archive instead of the patch set: slides DIR/p00_s0.tiff, ... of "
                             "--diagnoses diagnoses and --patients patients, and DIR/labels.csv (slide,label,patient); "
                             "--slide-size, --slide-mpp and --seed apply (default: none)")
    slides.add_argument("--slide-count", type=int, default=None,
                        help=f"number of slides (default: {DEFAULT_SLIDE_COUNT})")
    slides.add_argument("--slide-size", default=None, metavar="WxH",
                        help=f"level-0 size of each slide in pixels (default: {DEFAULT_SLIDE_SIZE[0]}x"
                             f"{DEFAULT_SLIDE_SIZE[1]}); with --archive the largest, each side drawn from half "
                             f"to all of it (default: {DEFAULT_ARCHIVE_SIZE[0]}x{DEFAULT_ARCHIVE_SIZE[1]})")
    slides.add_argument("--slide-mpp", type=float, default=None,
                        help=f"microns per pixel at level 0 (default: {DEFAULT_SLIDE_MPP}; "
                             f"{DEFAULT_ARCHIVE_MPP} with --archive)")
    archive = parser.add_argument_group("labelled archive (with --archive)")
    archive.add_argument("--diagnoses", type=int, default=None,
                         help=f"diagnoses d0, d1, ..., each a mixture of tissue classes (default: {DEFAULT_DIAGNOSES})")
    archive.add_argument("--patients", type=int, default=None,
                         help=f"patients p00, p01, ..., dealt to the diagnoses in turn; at least --diagnoses "
                              f"(default: {DEFAULT_PATIENTS})")
    archive.add_argument("--slides-per-patient", type=int, default=None,
                         help=f"slides of each patient (default: {DEFAULT_SLIDES_PER_PATIENT})")
    return parser


def slides_main(args: argparse.Namespace) -> list[dict]:
    size = DEFAULT_SLIDE_SIZE if args.slide_size is None else parse_slide_size(args.slide_size)
    mpp = DEFAULT_SLIDE_MPP if args.slide_mpp is None else args.slide_mpp
    records = write_slide_set(args.slides, count=DEFAULT_SLIDE_COUNT if args.slide_count is None else args.slide_count,
                              classes=DEFAULT_SLIDE_CLASSES if args.classes is None else args.classes,
                              size=size, mpp=mpp, seed=args.seed)
    boxes = sum(len(r["regions"]) for r in records)
    print(f"wrote {len(records)} slides of {size[0]}x{size[1]} px at {mpp:g} um/px with {boxes} tissue regions "
          f"to {args.slides} (regions listed in {Path(args.slides) / SLIDE_MARKER_NAME})")
    return records


def archive_main(args: argparse.Namespace) -> dict:
    record = write_archive(
        args.archive, diagnoses=DEFAULT_DIAGNOSES if args.diagnoses is None else args.diagnoses,
        patients=DEFAULT_PATIENTS if args.patients is None else args.patients,
        slides_per_patient=DEFAULT_SLIDES_PER_PATIENT if args.slides_per_patient is None else args.slides_per_patient,
        size=DEFAULT_ARCHIVE_SIZE if args.slide_size is None else parse_slide_size(args.slide_size),
        mpp=DEFAULT_ARCHIVE_MPP if args.slide_mpp is None else args.slide_mpp, seed=args.seed)
    print(f"wrote {len(record['slides'])} slides of {record['diagnoses']} diagnoses ({record['patients']} patients, "
          f"{record['slides_per_patient']} slides each, at most {record['size'][0]}x{record['size'][1]} px at "
          f"{record['mpp']:g} um/px) to {args.archive}; labels in {Path(args.archive) / ARCHIVE_LABELS_NAME}")
    return record


def main(args: argparse.Namespace) -> dict | list[dict]:
    archive_flags = [flag for flag, value in (("--diagnoses", args.diagnoses), ("--patients", args.patients),
                                              ("--slides-per-patient", args.slides_per_patient)) if value is not None]
    if args.archive is not None:
        if args.slides is not None:
            raise UserError("--archive and --slides write different things: give one of them")
        if args.classes is not None or args.slide_count is not None:
            flag = "--classes" if args.classes is not None else "--slide-count"
            raise UserError(f"{flag} does not apply to --archive: use --diagnoses, --patients and --slides-per-patient")
        return archive_main(args)
    if archive_flags:
        raise UserError(f"{archive_flags[0]} applies to a labelled archive only: add --archive DIR")
    if args.slides is not None:
        return slides_main(args)
    given = [flag for flag, value in (("--slide-count", args.slide_count), ("--slide-size", args.slide_size),
                                      ("--slide-mpp", args.slide_mpp)) if value is not None]
    if given:
        raise UserError(f"{given[0]} applies to whole slides only: add --slides DIR or --archive DIR")
    if args.classes is None:
        args.classes = MAX_CLASSES
    record = make_rgb_release(args.out, num_classes=args.classes, patch_size=args.patch_size,
                              train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                              seed=args.seed, scan_size=args.scan_size, hdf5=args.hdf5,
                              contact_sheet_path=args.contact_sheet, workers=args.workers)
    print(f"wrote {len(record['files'])} patches of {args.classes} classes "
          f"({args.train_per_class} train + {args.test_per_class} test each, {args.patch_size} px, "
          f"scans of {record['scan_size']} px) to {args.out}")
    if args.hdf5:
        print(f"wrote the HDF5 form to {args.hdf5}")
    if args.contact_sheet:
        print(f"wrote the contact sheet to {args.contact_sheet}")
    return record


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
