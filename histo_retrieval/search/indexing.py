"""Sources (slides, slide regions, folders of patches) to embedded patches, and into an index.

    for result in embed_sources(jobs, embedder, tiling, crop_size, workers=4):
        ...  # one SourceResult per job, in order: its patches' boxes and vectors, or why it failed

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
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from histo_retrieval.data.datasets import eval_crop, eval_crop_array
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.files import list_images
from histo_retrieval.images import UNREADABLE, load_rgb
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import PatchDatabase, SlideIndex, SourceRecord, file_stat
from histo_retrieval.search.slides import (SlideError, SlideOpener, Tiling, display_thumbnail, open_slide, read_plan, read_scaled,
                     tissue_grid)

SLIDE_ERRORS = (SlideError, *UNREADABLE, RuntimeError)  # RuntimeError: OpenSlide's own on a corrupt tile


def slide_errors() -> tuple[type[BaseException], ...]:
    try:
        import openslide
        return (*SLIDE_ERRORS, openslide.OpenSlideError)
    except (ImportError, OSError):
        return SLIDE_ERRORS


@dataclass(frozen=True)
class Job:
    """One unit of work: a slide (tiled where there is tissue), a region of a slide (tiled whole,
    level-0 x, y, width, height), or a list of patch image files (a folder source, or queries)."""
    path: str
    kind: str  # "slide" | "region" | "files"
    region: tuple[int, int, int, int] | None = None
    files: tuple[str, ...] = ()
    classes: tuple[str | None, ...] = ()


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

    def record(self, kind: str) -> SourceRecord:
        return SourceRecord(path=self.job.path, kind=kind, vectors=self.vectors, boxes=self.boxes,
                            tissue=self.tissue, files=self.files or None, classes=self.classes or None, **self.info)


@dataclass(frozen=True)
class _Chunk:
    """A sampler item: which patches of which job a worker reads."""
    job_number: int
    path: str
    kind: str
    start: int
    positions: tuple  # ((x, y, w, h) level-0 boxes) for slides and regions; file paths for lists
    level: int = 0
    out_size: int = 0
    fallback_mpp: float | None = None


class _ChunkReader(Dataset):
    """Reads a chunk's patches as uint8 eval crops; a worker keeps its last slide open."""

    def __init__(self, crop_size: int, opener: SlideOpener = open_slide) -> None:
        self.crop = eval_crop(crop_size)
        self.crop_size = crop_size
        self.opener = opener
        self._slide = None

    def __getitem__(self, chunk: _Chunk) -> tuple[_Chunk, torch.Tensor, list[int], list[tuple[str, str]], str | None]:
        kept, failed, images = [], [], []
        try:
            if chunk.kind == "files":
                for i, path in enumerate(chunk.positions):
                    try:
                        images.append(self.crop(load_rgb(path)))
                        kept.append(i)
                    except UNREADABLE as error:
                        failed.append((path, str(error) or type(error).__name__))
            else:
                slide = self._open(chunk.path, chunk.fallback_mpp)
                for i, (x, y, w, h) in enumerate(chunk.positions):
                    pixels = read_scaled(slide, chunk.level, x, y, w, h, chunk.out_size, chunk.out_size)
                    images.append(eval_crop_array(pixels, self.crop_size))
                    kept.append(i)
        except slide_errors() as error:
            return chunk, torch.zeros(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8), [], [], \
                f"{type(error).__name__}: {error}"
        stacked = torch.stack(images) if images else torch.zeros(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8)
        return chunk, stacked, kept, failed, None

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
             opener: SlideOpener = open_slide) -> tuple[_Plan, list[tuple], int, int]:
    """The job's patches: (plan, per-patch read items, level, output size)."""
    if job.kind == "files":
        boxes = np.zeros((len(job.files), 4), np.int64)
        return _Plan(boxes, files=list(job.files), classes=list(job.classes or [None] * len(job.files))), \
            list(job.files), 0, 0
    with opener(job.path, fallback_mpp) as slide:
        size, mtime = file_stat(job.path)
        info = {"file_size": size, "mtime": mtime, "width": slide.dimensions[0], "height": slide.dimensions[1],
                "slide_mpp": slide.mpp, "backend": slide.backend}
        if job.kind == "slide":
            grid = tissue_grid(slide, tiling)
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


def embed_sources(jobs: Sequence[Job], embedder: Embedder, tiling: Tiling, crop_size: int, workers: int = 0,
                  fallback_mpp: float | None = None, progress: bool = True,
                  opener: SlideOpener = open_slide) -> Iterator[SourceResult]:
    """Embed every job's patches; yields one SourceResult per job, in the order of `jobs`. Slides
    are opened with `opener` (a lender of open slides must be in-process: workers=0)."""
    plans: dict[int, _Plan] = {}
    chunk_size = embedder.batch_size
    bar = tqdm(total=0, unit="patch", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def sampler() -> Iterator[_Chunk]:
        for number, job in enumerate(jobs):
            started = time.perf_counter()
            try:
                plan, items, level, out_size = plan_job(job, tiling, fallback_mpp, opener)
            except slide_errors() as error:
                plans[number] = _Plan(np.zeros((0, 4), np.int64), error=str(error), started=started)
                continue
            plan.started = started
            plans[number] = plan
            bar.total += len(items)
            bar.refresh()
            for start in range(0, len(items), chunk_size):
                yield _Chunk(number, job.path, job.kind, start, tuple(items[start:start + chunk_size]), level,
                             out_size, fallback_mpp)

    loader = DataLoader(_ChunkReader(crop_size, opener), batch_size=None, sampler=sampler(), num_workers=workers,
                        collate_fn=_identity)
    parts: dict[int, list] = {}
    failures: dict[int, list] = {}
    errors: dict[int, str] = {}
    finished = 0
    read_in_job: dict[int, int] = {}
    run_started = time.perf_counter()

    def finish(number: int) -> SourceResult:
        plan = plans.pop(number)
        job = jobs[number]
        dim = None
        rows, kept = [], []
        for start, vectors, positions in parts.pop(number, []):
            rows.append(vectors)
            kept += [start + p for p in positions]
            dim = vectors.shape[1]
        error = plan.error or errors.pop(number, None)
        vectors = np.concatenate(rows) if rows else np.zeros((0, dim or 0), np.float32)
        kept_array = np.array(kept, dtype=np.int64)
        result = SourceResult(
            job, plan.boxes[kept_array] if len(kept) else plan.boxes[:0], vectors,
            None if plan.tissue is None else plan.tissue[kept_array] if len(kept) else plan.tissue[:0],
            [plan.files[i] for i in kept] if plan.files else [], [plan.classes[i] for i in kept] if plan.classes else [],
            plan.info, error, failures.pop(number, []), time.perf_counter() - plan.started)
        if error is not None:
            result.boxes, result.vectors = result.boxes[:0], result.vectors[:0]
        n = len(result.boxes)
        sources_done = number + 1
        if sources_done < len(jobs):  # overall time left, from the time the finished sources took
            left = (time.perf_counter() - run_started) / sources_done * (len(jobs) - sources_done)
            bar.set_postfix_str(f"{sources_done}/{len(jobs)} sources, about {_duration(left)} left")
        if progress:
            what = f"failed: {error}" if error else f"{n} patches in {result.seconds:.1f} s" + \
                (f" ({n / result.seconds:.0f}/s)" if result.seconds > 0 and n else "")
            tqdm.write(f"{Path(job.path).name}: {what}", file=sys.stderr)
        return result

    try:
        for chunk, images, positions, failed, error in loader:
            while finished < chunk.job_number:
                yield finish(finished)
                finished += 1
            if error is not None:
                errors.setdefault(chunk.job_number, error)
            elif chunk.job_number not in errors:
                if len(positions):
                    vectors = embedder.embed(images).float().cpu().numpy()
                    parts.setdefault(chunk.job_number, []).append((chunk.start, vectors, positions))
                failures.setdefault(chunk.job_number, []).extend(failed)
            bar.update(len(chunk.positions))
            read_in_job[chunk.job_number] = read_in_job.get(chunk.job_number, 0) + len(chunk.positions)
            rate = bar.format_dict.get("rate") or 0
            if progress and rate:
                left_in_slide = (len(plans[chunk.job_number].boxes) - read_in_job[chunk.job_number]) / rate
                bar.set_description_str(f"{Path(chunk.path).name}: {_duration(left_in_slide)} left", refresh=False)
        while finished < len(jobs):
            yield finish(finished)
            finished += 1
    finally:
        bar.close()


# ----------------------------------------------------------------------------- sources to jobs
MISSING = "no such slide, image or folder"


def _source_kind(path: str) -> str | None:
    """"folder" or "slide" for a source that is there, None for one that is not (or is neither)."""
    return "folder" if Path(path).is_dir() else "slide" if Path(path).is_file() else None


def check_sources(sources: Sequence[str]) -> None:
    """Refuse a command none of whose sources is there, before an index folder is created or opened;
    a missing source among others is left to index_sources, which skips it and reports it at the end."""
    if any(_source_kind(source) for source in sources):
        return
    what = MISSING if len(sources) == 1 else "none of these slides, images or folders exists"
    names = ", ".join(sources[:3]) + (", ..." if len(sources) > 3 else "")
    raise UserError(f"{names}: {what}; nothing to index, so no index folder was created or changed")


def source_jobs(sources: Sequence[str]) -> tuple[list[tuple[Job, str]], list[tuple[str, str]]]:
    """(job, kind) for each source on the command line: a folder is a list of patch files (class
    from the first-level subfolder), a file is a slide; and (path, reason) for each source not there."""
    jobs, missing, seen = [], [], set()
    for source in sources:
        path = os.path.abspath(source)
        if path in seen:  # named twice (a shell glob and a path): indexed once
            continue
        seen.add(path)
        kind = _source_kind(path)
        if kind == "folder":
            found = list_images(path)
            jobs.append((Job(path, "files", files=tuple(os.path.abspath(p) for p, _ in found),
                             classes=tuple(c for _, c in found)), "folder"))
        elif kind == "slide":
            jobs.append((Job(path, "slide"), "slide"))
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
    jobs, missing = source_jobs(sources)
    if rank == 0:  # reported once, not by every process
        report.failed += missing
    for job, kind in jobs:
        known = index.db.source_by_path(job.path)
        if known is not None and known["state"] == "indexed":
            if not replace:
                changed = kind == "slide" and Path(job.path).is_file() and \
                    file_stat(job.path) != (known["file_size"], known["mtime"])
                report.skipped.append(job.path)
                print(f"{job.path}: already indexed ({known['patch_count']} patches), skipped"
                      + ("; the file changed since, pass --replace to index it again" if changed else ""))
                continue
        if kind == "folder" and not job.files:
            if rank == 0:
                report.failed.append((job.path, "no image files in this folder or its subfolders"))
            continue
        todo.append((job, kind))
    todo = todo[rank::world_size]
    settings = index.settings
    tiling = Tiling(settings.mpp, settings.patch_size, settings.tissue_threshold)
    kinds = {job: kind for job, kind in todo}
    for result in embed_sources([job for job, _ in todo], embedder, tiling, settings.crop_size, workers,
                                fallback_mpp, progress):
        report.unreadable_files += result.failed
        path = result.job.path
        if result.error is not None:
            report.failed.append((path, result.error))
            (shard or index.db).add_failure(path, result.error)
            continue
        if kinds[result.job] == "folder" and not len(result.boxes):
            report.failed.append((path, "none of its images could be read"))
            continue
        record = result.record(kinds[result.job])
        if shard is not None:
            shard.add_source(record)
        else:
            known = index.db.source_by_path(path)
            if replace and known is not None and known["state"] == "indexed":  # the old one goes now
                index.remove(known["id"])
            index.add(record)
        report.indexed.append((path, len(result.boxes)))
    return report
