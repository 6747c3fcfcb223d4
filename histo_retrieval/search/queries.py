"""Answer queries against a slide index: matching patches, a ranking of slides, figures.

A query is a patch image (its centre crop at the index's scale), a region of a slide (tiled into
the index's patches, or one patch when smaller), or a whole slide (each of its tissue patches).
Every query patch gets its top-k matches; a query never gets itself back: an indexed patch image
is left out of its own matches, an indexed slide out of its own search. Slides are ranked as
Yottixel and SISH rank them: by the votes of the query patches' best matches (each patch's first
match votes for its slide), then by the mean similarity of the slide's patches among the top-k.

An indexed slide whose file changed since it was indexed (size or modification time) is not the
slide its patches were cut from: its matches are listed but their pixels are not drawn from the new
file, and a query with that file is searched as a new slide (its indexed patches are not left out).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from histo_retrieval.figures import pyplot, save_figure

from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.registry import RANDOM_WEIGHTS, load_encoder
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.errors import UserError
from histo_retrieval.files import atomic_write_text, command_line, list_images, write_csv
from histo_retrieval.images import UNREADABLE, load_rgb
from histo_retrieval.search.mosaic import MosaicSettings
from histo_retrieval.search.indexing import Job, SourceResult, slide_errors, embed_sources
from histo_retrieval.search.index import MANIFEST, Patch, SlideChanged, SlideIndex, check_unchanged, open_indexed_slide
from histo_retrieval.search.slides import Slide, SlideOpener, Tiling, best_level, decode_jpeg, open_slide, read_scaled

MATCH_FIELDS = ["query", "query_class", "query_x", "query_y", "query_width", "query_height", "rank", "source", "file", "x", "y",
                "width", "height", "mpp", "similarity", "class"]
SLIDE_FIELDS = ["query", "rank", "source", "score", "votes"]
FIGURE_SLIDES = 3  # matched slides drawn per query figure


QueryKind = Literal["patch", "region", "slide"]  # what a query is: an image, a region of a slide, a whole slide


@dataclass(frozen=True)
class Match:
    """An indexed patch found for a query, the shape every output takes it from (matches.csv, the
    API, the figures): its rank among the matches of its query patch (1 is the most similar), or
    among all of the query's patches (best_matches), and its similarity to the query patch."""
    rank: int
    similarity: float
    patch: Patch

    def to_row(self, query: QueryResult, box: Sequence[int], mpp: float) -> dict[str, object]:
        """The match as a line of matches.csv (MATCH_FIELDS); `box` is its query patch's, `mpp` the index's."""
        p = self.patch
        qx, qy, qw, qh = box if query.kind != "patch" else ("", "", "", "")
        return {"query": query.name, "query_class": query.class_name or "", "query_x": qx, "query_y": qy,
                "query_width": qw, "query_height": qh, "rank": self.rank, "source": p.source, "file": p.file or "",
                "x": p.x, "y": p.y, "width": p.width, "height": p.height, "mpp": "" if p.file else mpp,
                "similarity": f"{self.similarity:.6f}", "class": p.class_name or ""}


@dataclass(frozen=True)
class SlideRank:
    """An indexed slide in a query's ranking: by the votes of the query patches' first matches, then
    by the mean similarity (`score`) of its patches among all the matches."""
    rank: int
    source_id: int
    source: str  # its path
    score: float
    votes: int

    def to_row(self, query: QueryResult) -> dict[str, object]:
        """The slide as a line of slides.csv (SLIDE_FIELDS)."""
        return {"query": query.name, "rank": self.rank, "source": self.source, "score": f"{self.score:.6f}",
                "votes": self.votes}


@dataclass
class QueryResult:
    """One query: its patches (level-0 boxes in the query's own slide, or a file), each with its
    matches, and the ranking of the indexed slides."""
    name: str
    kind: QueryKind
    path: str  # the image, region's slide or slide; an image in memory's label
    boxes: np.ndarray
    vectors: np.ndarray
    matches: list[list[Match]]
    slides: list[SlideRank] = field(default_factory=list)
    class_name: str | None = None  # a patch query's, when its folder or file-name prefix is a class of the index
    figure: str | None = None
    pixels: np.ndarray | None = None  # a query of pixels in memory: its image, as searched


def load_index_encoder(index: SlideIndex, device: torch.device | str, checkpoint: str | None = None,
                       weights: str | None = None) -> Encoder:
    """The encoder the index was built with, rebuilt from its manifest (spec, weights file, options),
    refused when its weights are not those the index's vectors came from. `checkpoint` is a
    checkpoint index's checkpoint that moved, `weights` a timm or preset index's weights file that moved."""
    settings = index.settings
    if settings.kind == "checkpoint":
        if weights:
            raise UserError(f"--encoder-weights {weights}: this index was built with a checkpoint of this project; "
                            "pass it with --checkpoint if it moved")
        path = checkpoint or settings.checkpoint
        if not Path(path).is_file():
            raise UserError(f"{path}: the index's checkpoint is missing; pass its new place with --checkpoint")
        encoder = load_encoder(path, device, crop_size=settings.crop_size)
        what, flag = path, "the index's checkpoint with --checkpoint"
    else:
        if checkpoint:
            raise UserError(f"--checkpoint {checkpoint}: this index was built with --encoder {settings.spec}; pass "
                            "its weights with --encoder-weights if they moved")
        path = weights or settings.checkpoint or None
        if settings.kind in ("timm", "preset") and path and path != RANDOM_WEIGHTS and not Path(path).is_file():
            if settings.kind == "timm" or weights:
                raise UserError(f"{path}: the weights of the index's encoder ({settings.spec}) are missing; pass "
                                "their new place with --encoder-weights FILE")
            path = None  # a preset finds its weights in its own folder or the Hugging Face cache
        # Recorded as built (a preset's own options with the user's over them): building with them again is the same.
        encoder = load_encoder(settings.spec, device, weights=path, options=settings.model_options or None)
        what, flag = path or settings.spec, "the index's weights file with --encoder-weights"
    if encoder.weights_sha256() != settings.weights_sha256:
        raise UserError(f"{what}: not the weights this index was built with (their hash differs); pass {flag}")
    return encoder


def query_jobs(items: Sequence[str], region: tuple[int, int, int, int] | None = None,
               fallback_mpp: float | None = None, mosaic: MosaicSettings | None = None) -> list[Job]:
    """Jobs for the query arguments: a folder's images and a plain image are patch queries, a
    whole-slide file is a slide query (its `mosaic` only, when given), and with `region` each file
    is a region query."""
    jobs = []
    for item in items:
        path = os.path.abspath(item)
        if Path(path).is_dir():
            found = [os.path.abspath(p) for p, _ in list_images(path)]
            if not found:
                raise UserError(f"{item}: no image files in this folder")
            jobs.append(Job(path, "files", files=tuple(found)))
        elif not Path(path).is_file():
            raise UserError(f"{item}: no such image, slide or folder")
        elif region is not None:
            jobs.append(Job(path, "region", region=region))
        else:
            try:
                with open_slide(path, fallback_mpp) as slide:
                    is_slide = slide.is_pyramid
            except slide_errors():
                is_slide = False  # an unreadable file: reported as an unreadable patch
            jobs.append(Job(path, "slide", mosaic=mosaic) if is_slide else Job(path, "files", files=(path,)))
    return jobs


def _exclusions(index: SlideIndex, result: SourceResult) -> list[np.ndarray]:
    """Per query patch, the patch ids it must not get back: itself when it is an indexed patch
    image, every patch of its slide when the whole slide is indexed."""
    none = np.zeros(0, np.int64)
    if result.job.kind == "files":
        own = index.patches_of_files(result.files)
        return [np.array([own[f]], np.int64) if f in own else none for f in result.files]
    if result.job.kind == "slide":
        known = index.source_by_path(result.job.path)
        if known is not None and known.state == "indexed":
            try:
                check_unchanged(known)
            except SlideChanged as changed:
                print(f"note: {changed}; until then it is searched as a new slide, its indexed patches "
                      "included", file=sys.stderr)
                return [none] * len(result.boxes)
            ids = index.patch_ids(known.id)
            return [ids] * len(result.boxes)
    return [none] * len(result.boxes)


def search_matches(index: SlideIndex, vectors: np.ndarray, top_k: int, exclude: Sequence[np.ndarray] | None = None,
                   nprobe: int | None = None, ef_search: int | None = None) -> list[list[Match]]:
    """Each query vector's top-k matches in the index, best first, never one of its `exclude` ids."""
    scores, ids = index.search(vectors, top_k, exclude, nprobe, ef_search)
    patches = index.patches(np.unique(ids[ids >= 0]))
    return [[Match(rank + 1, float(s), patches[int(i)]) for rank, (s, i) in enumerate(zip(row_s, row_i))
             if i >= 0 and int(i) in patches] for row_s, row_i in zip(scores, ids)]


def rank_slides(matches: Sequence[Sequence[Match]]) -> list[SlideRank]:
    """The indexed slides ranked by the votes of the query patches' first matches, then by the
    mean similarity of their patches among all the top-k matches."""
    votes: dict[str, int] = {}
    similarities: dict[str, list[float]] = {}
    ids: dict[str, int] = {}
    matches = [[m for m in row if m.patch.file is None] for row in matches]  # folders of patches are no slides
    for patch_matches in matches:
        if patch_matches:
            first = patch_matches[0].patch.source
            votes[first] = votes.get(first, 0) + 1
        for match in patch_matches:
            similarities.setdefault(match.patch.source, []).append(match.similarity)
            ids[match.patch.source] = match.patch.source_id
    ranked = sorted(similarities, key=lambda s: (-votes.get(s, 0), -float(np.mean(similarities[s])), s))
    return [SlideRank(rank + 1, ids[source], source, float(np.mean(similarities[source])), votes.get(source, 0))
            for rank, source in enumerate(ranked)]


def run_queries(index: SlideIndex, jobs: Sequence[Job], embedder: Embedder, top_k: int = 10,
                out_dir: str | os.PathLike | None = "retrieval", heatmap: bool = False, workers: int = 0,
                fallback_mpp: float | None = None, nprobe: int | None = None, ef_search: int | None = None,
                progress: bool = True, opener: SlideOpener = open_slide,
                ) -> tuple[list[QueryResult], list[tuple[str, str]]]:
    """Search the index with every query; returns the results and (path, reason) of the queries
    that could not be read. matches.csv, slides.csv, query.json and one PNG per query go to out_dir.
    Query slides are opened with `opener` (the search page lends its open handle)."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    settings = index.settings
    tiling = Tiling(settings.mpp, settings.patch_size, settings.tissue_threshold)
    results, failed = [], []
    known = index.classes()
    for result in embed_sources(jobs, embedder, tiling, settings.input_steps, workers, fallback_mpp, progress, opener):
        failed += result.failed
        if result.error is not None:
            failed.append((result.job.path, result.error))
            continue
        if not len(result.boxes):
            if result.job.kind == "slide":
                failed.append((result.job.path, "no tissue found at the index's --tissue-threshold"))
            continue
        matches = search_matches(index, result.vectors, top_k, _exclusions(index, result), nprobe, ef_search)
        results += _query_results(result, matches, known)
    if not results and not failed:
        raise UserError("no queries to answer")
    if out_dir is not None and results:
        write_outputs(index, results, Path(out_dir), heatmap, top_k)
    return results, failed


def query_class(path: str, known: set[str]) -> str | None:
    """The class of a query image: its folder's name or its `<class>_` file-name prefix, if the index knows it."""
    folder, prefix = Path(path).parent.name, Path(path).name.split("_", 1)[0]
    return folder if folder in known else prefix if prefix in known else None


def _query_results(result: SourceResult, matches: list[list[Match]], known: set[str]) -> list[QueryResult]:
    job = result.job
    if job.kind == "files":  # each image is a query of its own
        return [QueryResult(path, "patch", path, result.boxes[i:i + 1], result.vectors[i:i + 1], [matches[i]],
                            rank_slides([matches[i]]), query_class(path, known)) for i, path in enumerate(result.files)]
    if job.kind == "pixels":
        return [QueryResult(job.path, "patch", job.path, result.boxes, result.vectors, matches, rank_slides(matches),
                            query_class(job.path, known), pixels=job.pixels)]
    name = job.path if job.kind == "slide" else f"{job.path}@{','.join(map(str, job.region))}"
    return [QueryResult(name, job.kind, job.path, result.boxes, result.vectors, matches, rank_slides(matches))]


# ----------------------------------------------------------------------------- outputs
def write_outputs(index: SlideIndex, results: Sequence[QueryResult], out_dir: Path, heatmap: bool,
                  top_k: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    mpp = index.settings.mpp
    match_rows, slide_rows = [], []
    changed: dict[str, str] = {}
    for number, result in enumerate(results):
        result.figure = str(out_dir / f"{number:03d}_{Path(result.path).stem}.png")
        draw_query(index, result, result.figure, heatmap, changed)
        for box, patch_matches in zip(result.boxes.tolist(), result.matches):
            match_rows += [match.to_row(result, box, mpp) for match in patch_matches]
        slide_rows += [slide.to_row(result) for slide in result.slides]
    for reason in changed.values():
        print(f"note: {reason}; its matches are listed, their patches not drawn", file=sys.stderr)
    write_csv(match_rows, out_dir / "matches.csv", MATCH_FIELDS)
    write_csv(slide_rows, out_dir / "slides.csv", SLIDE_FIELDS)
    atomic_write_text(out_dir / "query.json", json.dumps({
        "command": command_line(), "index": str(index.directory.resolve()), "top_k": top_k, "heatmap": heatmap,
        "manifest": json.loads((index.directory / MANIFEST).read_text()),
        "queries": [r.name for r in results]}, indent=2) + "\n")


def cut_patch(slide: Slide, patch: Patch, size: int) -> np.ndarray:
    """An indexed slide patch's pixels, as the index cut them (size x size), from its open slide."""
    level = best_level(slide.level_downsamples, patch.width / size)
    return read_scaled(slide, level, patch.x, patch.y, patch.width, patch.height, size, size)


def patch_pixels(index: SlideIndex, patch: Patch) -> np.ndarray | None:
    """The pixels of an indexed patch as the index cut them, or None when its file is gone;
    SlideChanged when its slide's file is not the one indexed any more."""
    try:
        if patch.file:
            return np.asarray(load_rgb(patch.file))
        record = index.source_by_path(patch.source)
        if record is None:
            return None
        with open_indexed_slide(record) as slide:
            return cut_patch(slide, patch, index.settings.patch_size)
    except slide_errors():
        return None


def query_pixels(result: QueryResult, index: SlideIndex, opener: SlideOpener = open_slide) -> np.ndarray | None:
    """What the figure shows as the query: the image, the region, or the slide's thumbnail."""
    try:
        if result.pixels is not None:
            return result.pixels
        if result.kind == "patch":
            return np.asarray(load_rgb(result.path))
        with opener(result.path, None) as slide:
            x0, y0 = result.boxes[:, 0].min(), result.boxes[:, 1].min()
            x1, y1 = (result.boxes[:, 0] + result.boxes[:, 2]).max(), (result.boxes[:, 1] + result.boxes[:, 3]).max()
            if result.kind == "slide":
                x0, y0, (x1, y1) = 0, 0, slide.dimensions
            scale = min(1.0, 512 / max(x1 - x0, y1 - y0))
            level = best_level(slide.level_downsamples, 1 / scale)
            return read_scaled(slide, level, int(x0), int(y0), int(x1 - x0), int(y1 - y0),
                               max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    except (*UNREADABLE, *slide_errors()):
        return None


def slide_heat(index: SlideIndex, source_id: int, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patch ids, similarity of each patch of a source to the closest query patch)."""
    ids, vectors = index.source_vectors(source_id)
    return ids, (vectors @ queries.T).max(axis=1) if len(ids) else np.zeros(0, np.float32)


def best_matches(result: QueryResult) -> list[Match]:
    """The matches of all the query's patches, best first, each indexed patch once, ranked among them."""
    best, seen = [], set()
    for match in sorted((m for row in result.matches for m in row), key=lambda m: -m.similarity):
        if match.patch.id not in seen:
            seen.add(match.patch.id)
            best.append(replace(match, rank=len(best) + 1))
    return best


def heat_colours(heat: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(lowest, highest, n x 4 RGBA magma colours in [0, 1]) of patch similarities, spread over
    their own range: an untrained or weak model's similarities crowd near 1."""
    from matplotlib import colormaps
    low, high = (float(heat.min()), float(heat.max())) if len(heat) else (0.0, 0.0)
    return low, high, colormaps["magma"]((heat - low) / (high - low) if high > low else np.ones_like(heat))


def draw_query(index: SlideIndex, result: QueryResult, path: str, heatmap: bool,
               changed: dict[str, str] | None = None) -> None:
    """The query, its best matches, then each of the first matched slides' thumbnails with the
    matching patches outlined (and, with heatmap, every patch coloured by its similarity). A match
    on a slide whose file changed since it was indexed is left blank; `changed` gets its reason."""
    flat = best_matches(result)
    best = flat[:max(len(row) for row in result.matches) if result.matches else 0]
    slides = result.slides[:FIGURE_SLIDES]
    columns = max(len(best) + 1, len(slides), 1)
    plt = pyplot()
    fig, axes = plt.subplots(2 if slides else 1, columns, figsize=(2.3 * columns, 5.2 if slides else 2.8),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    query_image = query_pixels(result, index)
    if query_image is not None:
        axes[0, 0].imshow(query_image)
    axes[0, 0].set_title(f"query ({result.kind})\n{Path(result.path).name}"
                         + (f"\n{result.class_name}" if result.class_name else ""), fontsize=8)
    for place, (ax, match) in enumerate(zip(axes[0, 1:], best), start=1):
        try:
            pixels = patch_pixels(index, match.patch)
        except SlideChanged as reason:
            pixels = None
            if changed is not None:
                changed[match.patch.source] = str(reason)
        if pixels is not None:
            ax.imshow(pixels)
        where = Path(match.patch.file).name if match.patch.file else f"{match.patch.x},{match.patch.y}"
        ax.set_title(f"#{place} {match.similarity:.3f} {match.patch.class_name or ''}\n"
                     f"{Path(match.patch.source).name}\n{where}", fontsize=7)
        if result.class_name is not None:  # a frame says right (green) or wrong (red) class
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if match.patch.class_name == result.class_name else "red")
                spine.set_linewidth(4)
    for ax, slide in zip(axes[1] if slides else [], slides):
        source = slide.source
        ax.set_title(Path(source).name, fontsize=8)
        thumbnail = index.thumbnail(slide.source_id)
        if thumbnail is None:
            continue
        downsample = thumbnail.downsample
        ax.imshow(decode_jpeg(thumbnail.jpeg))
        if heatmap:
            ids, heat = slide_heat(index, slide.source_id, result.vectors)
            boxes = index.patches(ids)
            low, high, colours = heat_colours(heat)
            ax.set_title(f"{Path(source).name}\nheat: similarity {low:.3f} to {high:.3f}", fontsize=8)
            for patch_id, colour in zip(ids.tolist(), colours):
                p = boxes[patch_id]
                ax.add_patch(plt.Rectangle((p.x / downsample, p.y / downsample), p.width / downsample,
                                           p.height / downsample, color=colour, alpha=0.55, linewidth=0))
        for match in (m for m in flat if m.patch.source == source):
            p = match.patch
            ax.add_patch(plt.Rectangle((p.x / downsample, p.y / downsample), p.width / downsample,
                                       p.height / downsample, fill=False, edgecolor="lime", linewidth=1.2))
    fig.tight_layout()
    save_figure(fig, path)
