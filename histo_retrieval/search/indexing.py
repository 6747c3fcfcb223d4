"""Sources (slides, slide regions, folders of patches, pixels) to embedded patches, and into an index.

    for result in embed_sources(jobs, embedder, tiling, encoder.input_steps, workers=4):
        ...  # one SourceResult per job, in order: its patches' boxes and vectors, or why it failed
    report = build_index("slide_index", ["a.svs", "patches/"], settings, embedder)  # retrieve.py index

One DataLoader serves every source: its sampler walks the jobs in the main process, finding a
slide's tissue on its thumbnail when the slide comes up (while the workers still read the previous
one), and hands out chunks of patch positions; each worker reads its chunks' regions through its
own handle of the slide. Patches go through the model in chunks of the embedder's batch size.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from histo_retrieval import distributed
from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.files import command_line, list_images
from histo_retrieval.images import UNREADABLE, load_rgb
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import (MANIFEST, SHARDS, IndexSettings, PatchDatabase, SlideIndex, SourceKind,
                                          SourceRecord, file_stat)
from histo_retrieval.search.mosaic import MosaicSettings, mosaic_grid
from histo_retrieval.search.slides import (SlideError, SlideOpener, Tiling, display_thumbnail, open_slide, read_plan,
                                           read_scaled, tissue_grid)

SLIDE_ERRORS = (SlideError, *UNREADABLE, RuntimeError)  # RuntimeError: OpenSlide's own on a corrupt tile

JobKind = Literal["slide", "region", "files", "pixels"]  # what a job reads
SOURCE_KINDS: dict[JobKind, SourceKind] = {"slide": "slide", "files": "folder"}  # the jobs an index run makes


def slide_errors() -> tuple[type[BaseException], ...]:
    try:
        import openslide
        return (*SLIDE_ERRORS, openslide.OpenSlideError)
    except (ImportError, OSError):
        return SLIDE_ERRORS


@dataclass(frozen=True)
class Job:
    """One unit of work: a slide (tiled where there is tissue), a region of a slide (tiled whole,
    level-0 x, y, width, height), a list of patch image files (a folder source, or queries), or an
    image in memory ("pixels": an H x W x 3 uint8 array, such as an upload; `path` is its label,
    never read; `cropped` when the array is already what the encoder's input steps made of it).
    A slide job with `mosaic` reads its mosaic's patches only (histo_retrieval.search.mosaic)."""
    path: str
    kind: JobKind
    region: tuple[int, int, int, int] | None = None
    files: tuple[str, ...] = ()
    classes: tuple[str | None, ...] = ()
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    cropped: bool = False
    mosaic: MosaicSettings | None = None

    def __post_init__(self) -> None:
        if (self.kind == "pixels") != (self.pixels is not None):
            raise ValueError(f"{self.path}: pixels come with a job of kind 'pixels' only")
        if self.pixels is not None and (self.pixels.dtype != np.uint8 or self.pixels.ndim != 3
                                        or self.pixels.shape[2] != 3):
            raise ValueError(f"{self.path}: pixels must be H x W x 3 uint8, got {self.pixels.dtype} "
                             f"{self.pixels.shape}")

    @classmethod
    def of_pixels(cls, pixels: np.ndarray, label: str, cropped: bool = False) -> Job:
        """A query of one image in memory, named `label` (its `<class>_` prefix may name its class);
        `cropped`: the image is already the encoder's input crop (the search page's uploads are
        cropped where they are decoded: a resize is not undone by cropping again)."""
        return cls(label, "pixels", pixels=pixels, cropped=cropped)


@dataclass
class SourceResult:
    """What a job gave: n patches (level-0 boxes, tissue fractions, files, classes) and their
    n x dim vectors; `error` names why a whole job failed, `failed` the unreadable files of a list."""
    job: Job
    boxes: np.ndarray
    vectors: np.ndarray
    tissue: np.ndarray | None = None
    files: list[str | None] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    error: str | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> SourceRecord:
        """The result as a source of an index (a slide job's, or a folder's list of files)."""
        return SourceRecord(path=self.job.path, kind=SOURCE_KINDS[self.job.kind], vectors=self.vectors,
                            boxes=self.boxes, tissue=self.tissue, files=self.files or None,
                            classes=self.classes or None, **self.info)


@dataclass(frozen=True)
class Chunk:
    """A sampler item: which patches of which job a worker reads."""
    job_number: int
    path: str
    kind: JobKind
    start: int
    positions: tuple  # level-0 (x, y, w, h) boxes (slides, regions), file paths (files) or arrays (pixels)
    level: int = 0
    out_size: int = 0
    fallback_mpp: float | None = None
    cropped: bool = False  # pixels already through the input steps


class ChunkRead(NamedTuple):
    """A chunk as a worker read it: its uint8 eval crops, which of its positions they are, the
    unreadable files among them (path, reason), or the error that stopped the read."""
    chunk: Chunk
    images: torch.Tensor
    kept: list[int]
    failed: list[tuple[str, str]]
    error: str | None


class ChunkReader(Dataset):
    """Reads a chunk's patches as uint8 crops through the encoder's input steps (an int: the
    reference's centre crop of that size); a worker keeps its last slide open."""

    def __init__(self, steps: InputSteps | int, opener: SlideOpener = open_slide) -> None:
        self.crop = InputSteps.of(steps)
        self.crop_size = self.crop.crop_size
        self.opener = opener
        self._slide = None

    def __getitem__(self, chunk: Chunk) -> ChunkRead:
        kept, failed, images = [], [], []
        try:
            if chunk.kind == "files":
                for i, path in enumerate(chunk.positions):
                    try:
                        images.append(self.crop(load_rgb(path)))
                        kept.append(i)
                    except UNREADABLE as error:
                        failed.append((path, str(error) or type(error).__name__))
            elif chunk.kind == "pixels":  # the same crop as of the image saved and read back as a file
                for i, pixels in enumerate(chunk.positions):
                    images.append(self._cropped(pixels) if chunk.cropped else self.crop(pixels))
                    kept.append(i)
            else:
                slide = self._open(chunk.path, chunk.fallback_mpp)
                for i, (x, y, w, h) in enumerate(chunk.positions):
                    pixels = read_scaled(slide, chunk.level, x, y, w, h, chunk.out_size, chunk.out_size)
                    images.append(self.crop(pixels))
                    kept.append(i)
        except slide_errors() as error:
            return ChunkRead(chunk, self._none(), [], [], f"{type(error).__name__}: {error}")
        return ChunkRead(chunk, torch.stack(images) if images else self._none(), kept, failed, None)

    def _cropped(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.shape[:2] != (self.crop_size, self.crop_size):
            raise ValueError(f"a cropped image must be {self.crop_size} x {self.crop_size}, got {pixels.shape[:2]}")
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()

    def _none(self) -> torch.Tensor:
        return torch.zeros(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8)

    def _open(self, path: str, fallback_mpp: float | None):
        if self._slide is None or self._slide.path != path:
            if self._slide is not None:
                self._slide.close()
            self._slide = None
            self._slide = self.opener(path, fallback_mpp)
        return self._slide


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def _identity(item):
    return item


@dataclass
class _Plan:
    """A job as the sampler laid it out: its patches, or why it cannot be read."""
    boxes: np.ndarray
    tissue: np.ndarray | None = None
    files: list[str | None] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    error: str | None = None
    started: float = 0.0


def plan_job(job: Job, tiling: Tiling, fallback_mpp: float | None,
             opener: SlideOpener = open_slide) -> tuple[_Plan, list, int, int]:
    """The job's patches: (plan, per-patch read items, level, output size)."""
    if job.kind == "files":
        boxes = np.zeros((len(job.files), 4), np.int64)
        return _Plan(boxes, files=list(job.files), classes=list(job.classes or [None] * len(job.files))), \
            list(job.files), 0, 0
    if job.kind == "pixels":
        return _Plan(np.zeros((1, 4), np.int64)), [job.pixels], 0, 0
    with opener(job.path, fallback_mpp) as slide:
        size, mtime = file_stat(job.path)
        info = {"file_size": size, "mtime": mtime, "width": slide.dimensions[0], "height": slide.dimensions[1],
                "slide_mpp": slide.mpp, "backend": slide.backend}
        if job.kind == "slide":
            grid = tissue_grid(slide, tiling)
            if job.mosaic is not None:  # chosen on the thumbnail: the other patches are never read
                grid = mosaic_grid(grid, job.mosaic)
            thumbnail, downsample = display_thumbnail(grid.thumbnail, grid.thumbnail_downsample)
            info.update(thumbnail=thumbnail, thumbnail_downsample=downsample)
            plan = grid.read
            boxes = np.concatenate([grid.positions, np.full((len(grid.positions), 2), plan.size0)], axis=1)
            return _Plan(boxes.astype(np.int64).reshape(-1, 4), grid.tissue, info=info), \
                [tuple(map(int, box)) for box in boxes], plan.level, plan.patch_size
        plan = read_plan(slide, tiling)
        x, y, width, height = job.region
        if x < 0 or y < 0 or width < 1 or height < 1 or x + width > slide.dimensions[0] \
                or y + height > slide.dimensions[1]:
            raise SlideError(f"{job.path}: --region {x},{y},{width},{height} is not inside the slide's "
                             f"{slide.dimensions[0]} x {slide.dimensions[1]} level-0 pixels")
        if width < plan.size0 or height < plan.size0:  # smaller than a patch: the region is the patch
            boxes = np.array([[x, y, width, height]], np.int64)
        else:
            xs = np.arange(x, x + width - plan.size0 + 1, plan.size0)
            ys = np.arange(y, y + height - plan.size0 + 1, plan.size0)
            grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
            boxes = np.stack([grid_x.ravel(), grid_y.ravel(), np.full(grid_x.size, plan.size0),
                              np.full(grid_x.size, plan.size0)], axis=1).astype(np.int64)
        return _Plan(boxes, info=info), [tuple(map(int, box)) for box in boxes], plan.level, plan.patch_size


class EmbeddingProgress:
    """What embed_sources shows on stderr: a bar of the patches read, with the time left in the
    source being read and in the whole run, and a line for each source finished. Hidden when not
    `shown`."""

    def __init__(self, jobs: int, shown: bool = True) -> None:
        self.jobs, self.shown = jobs, shown
        self.bar = tqdm(total=0, unit="patch", disable=not shown, dynamic_ncols=True, file=sys.stderr)
        self.started = time.perf_counter()
        self._read: dict[int, int] = {}  # patches read so far of each job being read

    def planned(self, patches: int) -> None:
        """A job laid out: its patches join the bar's total."""
        self.bar.total += patches
        self.bar.refresh()

    def read(self, chunk: Chunk, job_patches: int) -> None:
        """A chunk read, of a job of `job_patches` patches."""
        self.bar.update(len(chunk.positions))
        read = self._read[chunk.job_number] = self._read.get(chunk.job_number, 0) + len(chunk.positions)
        rate = self.bar.format_dict.get("rate") or 0
        if self.shown and rate:
            self.bar.set_description_str(f"{Path(chunk.path).name}: {_duration((job_patches - read) / rate)} left",
                                         refresh=False)

    def finished(self, number: int, result: SourceResult) -> None:
        """Job `number` finished (jobs finish in order)."""
        self._read.pop(number, None)
        done = number + 1
        if done < self.jobs:  # overall time left, from the time the finished sources took
            left = (time.perf_counter() - self.started) / done * (self.jobs - done)
            self.bar.set_postfix_str(f"{done}/{self.jobs} sources, about {_duration(left)} left")
        if self.shown:
            n = len(result.boxes)
            what = f"failed: {result.error}" if result.error else f"{n} patches in {result.seconds:.1f} s" + \
                (f" ({n / result.seconds:.0f}/s)" if result.seconds > 0 and n else "")
            tqdm.write(f"{Path(result.job.path).name}: {what}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class EmbeddingRun:
    """embed_sources' steps over one list of jobs: `plan` lays each job out as the loader's sampler
    reaches it and hands out its chunks, `read` embeds a chunk the loader read, `finish` assembles
    a job's SourceResult once the loader has moved past it; `progress` shows them."""

    def __init__(self, jobs: Sequence[Job], embedder: Embedder, tiling: Tiling, fallback_mpp: float | None = None,
                 opener: SlideOpener = open_slide, progress: EmbeddingProgress | None = None) -> None:
        self.jobs, self.embedder, self.tiling = jobs, embedder, tiling
        self.fallback_mpp, self.opener = fallback_mpp, opener
        self.progress = progress or EmbeddingProgress(len(jobs), shown=False)
        self.finished = 0  # jobs before this one have been finished
        self._plans: dict[int, _Plan] = {}
        self._parts: dict[int, list[tuple[int, np.ndarray, list[int]]]] = {}  # (chunk start, vectors, kept)
        self._unreadable: dict[int, list[tuple[str, str]]] = {}
        self._errors: dict[int, str] = {}

    def plan(self) -> Iterator[Chunk]:
        """The loader's sampler: each job laid out in turn (a slide's tissue found), then its patches
        in chunks of the embedder's batch size; a job that cannot be laid out gets no chunk."""
        chunk_size = self.embedder.batch_size
        for number, job in enumerate(self.jobs):
            started = time.perf_counter()
            try:
                plan, items, level, out_size = plan_job(job, self.tiling, self.fallback_mpp, self.opener)
            except slide_errors() as error:
                self._plans[number] = _Plan(np.zeros((0, 4), np.int64), error=str(error), started=started)
                continue
            plan.started = started
            self._plans[number] = plan
            self.progress.planned(len(items))
            for start in range(0, len(items), chunk_size):
                yield Chunk(number, job.path, job.kind, start, tuple(items[start:start + chunk_size]), level,
                            out_size, self.fallback_mpp, job.cropped)

    def read(self, item: ChunkRead) -> None:
        """Embed a chunk as read; after a read error in a job, its later chunks are only counted."""
        number = item.chunk.job_number
        if item.error is not None:
            self._errors.setdefault(number, item.error)
        elif number not in self._errors:
            if len(item.kept):
                vectors = self.embedder.embed(item.images).float().cpu().numpy()
                self._parts.setdefault(number, []).append((item.chunk.start, vectors, item.kept))
            self._unreadable.setdefault(number, []).extend(item.failed)
        self.progress.read(item.chunk, len(self._plans[number].boxes))

    def finish_before(self, number: int) -> Iterator[SourceResult]:
        """The results of the jobs before `number` not finished yet (the loader is past them), in order."""
        while self.finished < min(number, len(self.jobs)):
            yield self.finish(self.finished)
            self.finished += 1

    def finish(self, number: int) -> SourceResult:
        """Job `number`'s patches that were read, in its plan's order, with their vectors; none, and
        the reason, when it failed."""
        plan = self._plans.pop(number)
        parts = self._parts.pop(number, [])
        error = plan.error or self._errors.pop(number, None)
        dim = parts[0][1].shape[1] if parts else 0
        if error is None and parts:
            kept = np.concatenate([start + np.asarray(positions, np.int64) for start, _, positions in parts])
            vectors = np.concatenate([part_vectors for _, part_vectors, _ in parts])
        else:
            kept, vectors = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        result = SourceResult(
            self.jobs[number], plan.boxes[kept], vectors, None if plan.tissue is None else plan.tissue[kept],
            [plan.files[i] for i in kept] if plan.files else [],
            [plan.classes[i] for i in kept] if plan.classes else [], plan.info, error,
            self._unreadable.pop(number, []), time.perf_counter() - plan.started)
        self.progress.finished(number, result)
        return result


def embed_sources(jobs: Sequence[Job], embedder: Embedder, tiling: Tiling, steps: InputSteps | int, workers: int = 0,
                  fallback_mpp: float | None = None, progress: bool = True,
                  opener: SlideOpener = open_slide) -> Iterator[SourceResult]:
    """Embed every job's patches; yields one SourceResult per job, in the order of `jobs`. Slides
    are opened with `opener` (a lender of open slides must be in-process: workers=0)."""
    run = EmbeddingRun(jobs, embedder, tiling, fallback_mpp, opener, EmbeddingProgress(len(jobs), progress))
    loader = DataLoader(ChunkReader(steps, opener), batch_size=None, sampler=run.plan(), num_workers=workers,
                        collate_fn=_identity)
    try:
        for item in loader:
            yield from run.finish_before(item.chunk.job_number)
            run.read(item)
        yield from run.finish_before(len(jobs))
    finally:
        run.progress.close()


# ----------------------------------------------------------------------------- sources to jobs
MISSING = "no such slide, image or folder"


def _source_kind(path: str) -> SourceKind | None:
    """The kind of source at `path`, None for one that is not there (or is neither)."""
    return "folder" if Path(path).is_dir() else "slide" if Path(path).is_file() else None


def check_sources(sources: Sequence[str]) -> None:
    """Refuse a command none of whose sources is there, before an index folder is created or opened;
    a missing source among others is left to index_sources, which skips it and reports it at the end."""
    if any(_source_kind(source) for source in sources):
        return
    what = MISSING if len(sources) == 1 else "none of these slides, images or folders exists"
    names = ", ".join(sources[:3]) + (", ..." if len(sources) > 3 else "")
    raise UserError(f"{names}: {what}; nothing to index, so no index folder was created or changed")


def source_jobs(sources: Sequence[str], mosaic: MosaicSettings | None = None,
                ) -> tuple[list[Job], list[tuple[str, str]]]:
    """A job for each source on the command line: a folder is a list of patch files (class from the
    first-level subfolder), a file is a slide (its `mosaic` only, when given); and (path, reason)
    for each source not there."""
    jobs, missing, seen = [], [], set()
    for source in sources:
        path = os.path.abspath(source)
        if path in seen:  # named twice (a shell glob and a path): indexed once
            continue
        seen.add(path)
        kind = _source_kind(path)
        if kind == "folder":
            found = list_images(path)
            jobs.append(Job(path, "files", files=tuple(os.path.abspath(p) for p, _ in found),
                            classes=tuple(c for _, c in found)))
        elif kind == "slide":
            jobs.append(Job(path, "slide", mosaic=mosaic))
        else:
            missing.append((path, MISSING))
    return jobs, missing


@dataclass
class IndexReport:
    indexed: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)


def index_sources(index: SlideIndex, sources: Sequence[str], embedder: Embedder, workers: int = 0,
                  fallback_mpp: float | None = None, replace: bool = False, progress: bool = True,
                  rank: int = 0, world_size: int = 1, shard: PatchDatabase | None = None) -> IndexReport:
    """Index every source not indexed yet (each committed as soon as it is embedded); with
    `replace`, re-index those that are. A source that is not there is skipped and reported in
    `failed` (check_sources refuses a command with none that is). With world_size > 1 this process
    takes every world_size-th source and writes it into `shard` (merged by SlideIndex.merge_shards)."""
    report = IndexReport()
    todo = []
    jobs, missing = source_jobs(sources, index.settings.mosaic)
    if rank == 0:  # reported once, not by every process
        report.failed += missing
    for job in jobs:
        known = index.source_by_path(job.path)
        if known is not None and known.state == "indexed":
            if not replace:
                changed = job.kind == "slide" and Path(job.path).is_file() and known.file_changed()
                report.skipped.append(job.path)
                print(f"{job.path}: already indexed ({known.patch_count} patches), skipped"
                      + ("; the file changed since, pass --replace to index it again" if changed else ""))
                continue
        if job.kind == "files" and not job.files:
            if rank == 0:
                report.failed.append((job.path, "no image files in this folder or its subfolders"))
            continue
        todo.append(job)
    todo = todo[rank::world_size]
    settings = index.settings
    tiling = Tiling(settings.mpp, settings.patch_size, settings.tissue_threshold)
    for result in embed_sources(todo, embedder, tiling, settings.input_steps, workers, fallback_mpp, progress):
        report.unreadable_files += result.failed
        path = result.job.path
        if result.error is not None:
            report.failed.append((path, result.error))
            (shard or index).add_failure(path, result.error)
            continue
        if result.job.kind == "files" and not len(result.boxes):
            report.failed.append((path, "none of its images could be read"))
            continue
        if shard is not None:
            shard.add_source(result.record())
        else:
            known = index.source_by_path(path)
            if replace and known is not None and known.state == "indexed":  # the old one goes now
                index.remove(known.id)
            source_id = index.add(result.record())
            if known is not None and known.label:  # the same slide indexed again keeps its diagnosis
                index.set_labels({source_id: (known.label, known.patient)})
        report.indexed.append((path, len(result.boxes)))
    return report


# ----------------------------------------------------------------------------- retrieve.py index
@dataclass
class BuildReport(IndexReport):
    """build_index's report: what every process indexed, failed and could not read (`skipped` is
    this process's own, which every process finds alike), and what the index holds after the run
    (on the first process, which merges the others' shards; None on the others)."""
    held_sources: int | None = None
    held_patches: int | None = None


def _open_to_add(directory: Path, settings: IndexSettings) -> SlideIndex:
    """The index at `directory` opened for writing, created when there is none; refused when it
    was built with other settings (their vectors would not compare)."""
    if (directory / MANIFEST).is_file():
        index = SlideIndex.open(directory, writable=True)
        differences = index.settings.differences(settings)
        if differences:
            index.close()
            raise UserError(f"{directory}: this index was built with other settings; refusing to mix: "
                            + "; ".join(differences))
    else:
        index = SlideIndex.create(directory, settings)
    index.log_run(command_line())
    return index


def build_index(directory: str | os.PathLike, sources: Sequence[str], settings: IndexSettings, embedder: Embedder,
                workers: int = 0, fallback_mpp: float | None = None, replace: bool = False, progress: bool = True,
                rank: int = 0, world_size: int = 1) -> BuildReport:
    """Index `sources` into the index folder `directory`, created with `settings` when it is not
    there (an index built with other settings is refused). Under torchrun (`rank` of `world_size`
    processes, every one calling this): the first process creates or opens the index while the
    others wait, each indexes every world_size-th source into a shard database of its own, and the
    first merges the shards once all are done. Nothing is created when none of `sources` is there."""
    check_sources(sources)
    directory = Path(directory)
    index = _open_to_add(directory, settings) if rank == 0 else None
    distributed.barrier()
    try:
        if index is None:
            index = SlideIndex.open(directory, writable=False)
        shard = None
        if world_size > 1:
            (directory / SHARDS).mkdir(exist_ok=True)
            shard = PatchDatabase(directory / SHARDS / f"rank{rank:03d}.sqlite")
        try:
            own = index_sources(index, sources, embedder, workers, fallback_mpp, replace, progress and rank == 0,
                                rank, world_size, shard)
        finally:
            if shard is not None:
                shard.close()
        report = BuildReport(failed=distributed.all_gather_lists(own.failed),
                             unreadable_files=distributed.all_gather_lists(own.unreadable_files),
                             indexed=distributed.all_gather_lists(own.indexed), skipped=own.skipped)
        distributed.barrier()
        if rank == 0:
            index.merge_shards()
            report.held_sources, report.held_patches = len(index.sources()), index.patch_count()
    finally:
        if index is not None:
            index.close()
    return report
