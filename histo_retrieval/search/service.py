"""The search page's engine, free of any web framework: one index, read only, and its model.

    service = SearchService.open("slide_index", device="cpu")
    service.source_page(offset=0, limit=100, name="")  # what the index holds, a page at a time
    search = service.search_upload(data, "patch.png")  # or service.search_region(source_id, box)
    service.tile(source_id, level, col, row)           # Deep Zoom tiles (OpenSlide's DeepZoomGenerator)

Everything is addressed by the ids of the index's own records (sources, patches, searches): no
path from a request ever reaches the file system, so nothing outside the index can be read, and
the index is opened read-only, so nothing in it can be changed. Requests read the rows they need
by id, a page or a count at a time (never the whole list: an archive holds 100,000 slides). One
lock serialises the model and the SQLite connection (searches are model-bound); tiles are read outside it. Each slide's pixels
(tiles, patch images, region searches) come through one cached handle of its own, checked before
every use against the index's current record of its id and against its file: a file changed since
it was indexed is refused (SlideChanged, HTTP 409), never mixed with what the index holds.
"""
from __future__ import annotations

import io
import re
import threading
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Literal

import numpy as np
import torch
from PIL import Image

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.errors import UserError
from histo_retrieval.images import UNREADABLE
from histo_retrieval.search.indexing import Job, slide_errors
from histo_retrieval.search.index import (Patch, SlideChanged, SlideIndex, SourceKind, SourceRow, check_unchanged,
                                          open_indexed_slide)
from histo_retrieval.search.queries import (Match, QueryResult, SlideRank, best_matches, cut_patch, heat_colours,
                                            load_index_encoder, patch_pixels, query_pixels, run_queries, slide_heat)
from histo_retrieval.search.slide_evaluation import similar_slides
from histo_retrieval.search.slides import Slide, SlideOpener, best_level, open_slide

# The search page's limits, in one place (docs/search_page.md, "Security"); histo_retrieval/search/app.py enforces
# the request ones before a body is read.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an uploaded image file
UPLOAD_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around it
MAX_BODY_BYTES = 4 * 1024  # any other request body: a region search's JSON is about 100 bytes
MAX_UPLOAD_SIDE = 4096  # pixels a side: a query is a patch or a small region, never a whole slide
UPLOAD_FORMATS = ("PNG", "JPEG", "TIFF")  # single frame; Pillow tries no other decoder (none reaches Ghostscript)
DECODES_AT_ONCE = 2  # uploads decoded at the same time, so that memory stays bounded whatever the load
MAX_NAME_BYTES = 255  # an upload's file name, the longest most file systems allow
MAX_ID = 2**63 - 1  # SQLite's largest integer: no id above it can be in an index
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # slides an /api/slides page lists unless it asks for another number; at most
PREVIEW_SIDE = 512  # the query image shown with a search's results
MAX_REGION_PATCHES = 64  # a drawn region is tiled into at most this many query patches
TILE_SIZE, TILE_OVERLAP, TILE_FORMAT, TILE_QUALITY = 254, 1, "jpeg", 80
SIMILAR_SLIDES = 10  # slides a "find similar slides" answer lists unless it asks for another number
KEPT_SEARCHES = 32  # recent searches kept for their heat maps and query images
OPEN_SLIDE_BYTES = 512 * 2**20  # what the slides kept open may hold: a plain image's decoded pixels count whole
HANDLE_BYTES = 64 * 2**20  # a pyramid file's handle counts this much (nominal: its reader's own tile cache)


class NotFound(UserError):
    """An id the index does not hold (HTTP 404)."""


class BadInput(UserError):
    """A request the service cannot answer as sent: HTTP 400, 413 with `too_large`, 415 with `unsupported`."""

    def __init__(self, message: str, too_large: bool = False, unsupported: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.status = 413 if too_large else 415 if unsupported else 400


SearchKind = Literal["upload", "region"]  # how the page searched: with an uploaded image, or a drawn region


@dataclass
class Search:
    id: str
    kind: SearchKind
    name: str
    result: QueryResult
    source_id: int | None = None  # a region search's slide
    preview: bytes | None = None  # JPEG of the query as searched


def jpeg_bytes(pixels: np.ndarray | Image.Image, quality: int = 85, max_side: int | None = None) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# A run of directories of an absolute path (POSIX or Windows), but not the API's own "/api/..." routes.
_DIRECTORIES = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[\\/](?!api/)(?:[^\\/\s'\"()\[\],;]+[\\/])+")


def without_paths(message: str, paths: Iterable[str] = ()) -> str:
    """`message` with each absolute path in it cut to its last part: the known `paths` whole (they
    may hold spaces), then anything else that looks like one."""
    for path in sorted(set(paths), key=len, reverse=True):
        message = message.replace(path, Path(path).name)
    return _DIRECTORIES.sub("", message)


def upload_label(filename: str | None) -> str:
    """The upload's file name as a label for its search: never a path here, it names no file. A
    client may send a path; its last part is kept. BadInput when it cannot be a file name."""
    name = re.split(r"[\\/]", filename or "")[-1] or "upload"
    shown, size = repr(name if len(name) <= 60 else name[:60] + "..."), len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise BadInput(f"upload file name {shown}: {size} bytes; file names are limited to {MAX_NAME_BYTES}: "
                       "rename the file")
    if name in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadInput(f"upload file name {shown}: not a file name (a dot entry or a control character); "
                       "rename the file, e.g. patch.png")
    return name


def check_upload(upload: bytes | BinaryIO, filename: str) -> Image.Image:
    """The uploaded image, decoded as RGB; BadInput names the file and why it cannot be searched with.
    Only PNG, JPEG and TIFF of one frame, at most MAX_UPLOAD_SIDE a side (read from the header,
    before any pixel is decoded)."""
    stream = io.BytesIO(upload) if isinstance(upload, bytes) else upload
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    if not size:
        raise BadInput(f"{filename}: the upload is empty")
    if size > MAX_UPLOAD_BYTES:
        raise BadInput(f"{filename}: {size / 2**20:.1f} MB; uploads are limited to "
                       f"{MAX_UPLOAD_BYTES // 2**20} MB", too_large=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream, formats=UPLOAD_FORMATS) as image:
                width, height = image.size
                if width > MAX_UPLOAD_SIDE or height > MAX_UPLOAD_SIDE:
                    raise BadInput(f"{filename}: {width} x {height} pixels; uploads are limited to "
                                   f"{MAX_UPLOAD_SIDE} x {MAX_UPLOAD_SIDE} pixels (a patch at the index's scale "
                                   "is enough)", too_large=True)
                if getattr(image, "is_animated", False):
                    raise BadInput(f"{filename}: an image of several frames; upload a single patch image",
                                   unsupported=True)
                return image.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadInput(f"{filename}: too many pixels to decode safely ({error}); uploads are limited to "
                       f"{MAX_UPLOAD_SIDE} x {MAX_UPLOAD_SIDE} pixels", too_large=True) from None
    except Image.UnidentifiedImageError:
        raise BadInput(f"{filename}: not a PNG, JPEG or TIFF image; save the patch in one of those formats",
                       unsupported=True) from None
    except UNREADABLE as error:
        raise BadInput(f"{filename}: not an image Pillow can read (PNG, JPEG or TIFF): "
                       f"{str(error) or type(error).__name__}") from None


_DECODING = threading.BoundedSemaphore(DECODES_AT_ONCE)


def decode_upload(upload: bytes | BinaryIO, filename: str, steps: InputSteps | int) -> tuple[np.ndarray, Image.Image]:
    """(the crop the model sees, c x c x 3 uint8, through the index's input steps; a preview at most
    PREVIEW_SIDE a side) of an upload. The whole image lives only here, DECODES_AT_ONCE at a time:
    what follows holds a crop and a thumbnail."""
    with _DECODING:
        image = check_upload(upload, filename)
        crop = InputSteps.of(steps)(image)  # 3 x c x c uint8, exactly what the loader would make of a file
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return crop.permute(1, 2, 0).numpy(), image


class _SlideLevels:
    """What DeepZoomGenerator asks of a slide, answered through histo_retrieval.search.slides.Slide, for the slides
    OpenSlide does not read itself (tiffslide's regions have no alpha channel for it to composite)."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide
        self.properties: dict[str, str] = {}
        self.level_count = len(slide.level_dimensions)
        self.level_dimensions, self.level_downsamples = slide.level_dimensions, slide.level_downsamples
        self.dimensions = slide.dimensions

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return best_level(self.level_downsamples, downsample)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return Image.fromarray(self.slide.read(*location, level, *size)).convert("RGBA")


def _record_key(row: SourceRow) -> tuple:
    """What names an indexed slide's file: its id, path, size and modification time."""
    return row.id, row.path, row.file_size, row.mtime


class _OpenSlide:
    """A slide kept open for its tiles, patch images and region searches: its Deep Zoom generator,
    the index record it was opened for, and the bytes it counts for in the cache."""

    def __init__(self, slide: Slide, row: SourceRow) -> None:
        from openslide.deepzoom import DeepZoomGenerator
        self.slide = slide
        handle = slide.handle if slide.backend == "openslide" else _SlideLevels(slide)
        self.deep_zoom = DeepZoomGenerator(handle, TILE_SIZE, TILE_OVERLAP, limit_bounds=False)
        self.record = _record_key(row)
        width, height = slide.dimensions
        self.nbytes = width * height * len(slide.handle.getbands()) if slide.backend == "image" else HANDLE_BYTES

    def lend(self, path: str, fallback_mpp: float | None) -> Slide:
        """A SlideOpener for the searches of this slide: its open handle, not closed by them."""
        if path != self.slide.path:
            raise ValueError(f"{path}: not the slide lent ({self.slide.path})")
        return self.slide.shared()


class SearchService:
    def __init__(self, index: SlideIndex, embedder: Embedder, top_k: int = 10, nprobe: int | None = None,
                 ef_search: int | None = None) -> None:
        self.index, self.embedder, self.top_k, self.nprobe, self.ef_search = index, embedder, top_k, nprobe, ef_search
        self.lock = threading.RLock()
        self._sources: dict[int, SourceRow] = {}
        self._classes: set[str] = set()
        self._generation = self._classes_generation = -1
        self._searches: OrderedDict[str, Search] = OrderedDict()
        # Least recently used first. A slide dropped from it is not closed there: a request may still be
        # reading it (closing an OpenSlide handle under a read is unsafe); it closes when the last lets go.
        self._open: OrderedDict[int, _OpenSlide] = OrderedDict()
        self._open_lock = threading.Lock()

    @classmethod
    def open(cls, directory: str, device: torch.device | str = "cpu", checkpoint: str | None = None,
             batch_size: int = 32, amp: str = "off", channels_last: bool = False, top_k: int = 10,
             nprobe: int | None = None, ef_search: int | None = None,
             encoder_weights: str | None = None) -> SearchService:
        """The service over the index at `directory`, with the encoder it was built with (`checkpoint` or
        `encoder_weights`: its weights' new place if they moved)."""
        index = SlideIndex.open(directory, writable=False)
        try:
            loaded = load_index_encoder(index, device, checkpoint, encoder_weights)
            _ = index.vectors  # load (or rebuild) the faiss index now, not on the first search
        except BaseException:
            index.close()
            raise
        embedder = Embedder(loaded.model, device, batch_size, amp, channels_last, loaded.preprocessing)
        return cls(index, embedder, top_k, nprobe, ef_search)

    def close(self) -> None:
        with self._open_lock:
            for entry in self._open.values():
                entry.slide.close()
            self._open.clear()
        self.index.close()

    # ------------------------------------------------------------------ what the index holds
    def summary(self) -> dict:
        s = self.index.settings
        with self.lock:
            counts = self.index.source_counts()
            generation = self.index.generation
            if generation != self._classes_generation:
                self._classes, self._classes_generation = self.index.classes(), generation
        return {"model_name": s.model_name, "model_options": s.model_options, "checkpoint": Path(s.checkpoint).name,
                "encoder": Path(s.spec).name if s.kind == "checkpoint" else s.spec, "encoder_kind": s.kind,
                "crop_size": s.crop_size, "dim": s.dim, "mpp": s.mpp, "patch_size": s.patch_size,
                "tissue_threshold": s.tissue_threshold, "index_type": s.index_type,
                "slides": counts["slides"], "folders": counts["folders"], "patches": counts["patches"],
                "classes": sorted(self._classes), "top_k": self.top_k}

    def sources(self) -> dict[int, SourceRow]:
        """Every indexed source by id, read again whenever an index run has changed the database (all
        of them: requests use source(), sources_by_id() and source_page() instead)."""
        with self.lock:
            generation = self.index.generation
            if generation != self._generation:
                self._sources = {row.id: row for row in self.index.sources()}
                self._generation = generation
            return self._sources

    def source_page(self, offset: int = 0, limit: int = PAGE_SIZE, name: str = "",
                    kind: SourceKind | None = None) -> tuple[list[SourceRow], int]:
        """(the indexed sources from the `offset`-th, at most `limit`, by id; how many there are in all),
        only those of `kind` whose file name contains `name` when given."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise BadInput(f"limit {limit}: choose from 1 to {MAX_PAGE_SIZE}")
        if offset < 0:
            raise BadInput(f"offset {offset}: must be 0 or more")
        with self.lock:
            return self.index.source_page(offset, limit, name, kind)

    def sources_by_id(self, ids: Iterable[int]) -> dict[int, SourceRow]:
        """The indexed sources among `ids`, by id (ids the index does not hold are left out)."""
        with self.lock:
            return self.index.sources_by_id(list(ids))

    def source(self, source_id: int, kind: SourceKind | None = None) -> SourceRow:
        with self.lock:
            row = self.index.source(source_id)
        if row is None:
            raise NotFound(f"slide {source_id}: no such slide in the index; /api/slides lists them")
        if kind is not None and row.kind != kind:
            raise NotFound(f"source {source_id}: a folder of patch images, not a slide")
        return row

    def public_message(self, message: str) -> str:
        """An error message as the API shows it: slides and folders by their file names, and no
        other path of this machine (a slide library's error names the file it could not read)."""
        with self.lock:
            paths = self.index.paths_in(message) + [str(self.index.directory)]
        return without_paths(message, paths)

    def thumbnail(self, source_id: int) -> bytes:
        self.source(source_id)
        with self.lock:
            thumbnail = self.index.thumbnail(source_id)
        if thumbnail is None:  # a folder: its first patch stands for it
            with self.lock:
                first = self.index.patch_ids(source_id)[:1]
            return self.patch_image(int(first[0])) if len(first) else jpeg_bytes(np.full((8, 8, 3), 255, np.uint8))
        return thumbnail.jpeg

    def patch(self, patch_id: int) -> Patch:
        with self.lock:
            found = self.index.patches([patch_id]).get(patch_id)
        if found is None:
            raise NotFound(f"patch {patch_id}: no such patch in the index")
        return found

    def patch_image(self, patch_id: int) -> bytes:
        patch = self.patch(patch_id)
        try:
            if patch.file:
                pixels = patch_pixels(self.index, patch)
            else:  # through the slide's open handle: a plain image is not decoded again for each patch
                pixels = cut_patch(self._slide(patch.source_id).slide, patch, self.index.settings.patch_size)
        except slide_errors():
            pixels = None
        if pixels is None:
            raise NotFound(f"patch {patch_id}: its slide or file can no longer be read")
        return jpeg_bytes(pixels, max_side=256)

    # ------------------------------------------------------------------ open slides
    def _slide(self, source_id: int) -> _OpenSlide:
        """The slide's open handle, for the file the index holds under this id: opened again when
        the index's record of the id is not the one it was opened for, refused (SlideChanged) when
        the file is not the one indexed any more."""
        row = self.source(source_id, "slide")
        with self._open_lock:
            sources = self.sources_by_id(self._open)
            for sid in [sid for sid, kept in self._open.items()
                        if sid not in sources or kept.record != _record_key(sources[sid])]:
                del self._open[sid]  # removed from the index, or its id now names another file
            entry = self._open.get(source_id)
            try:
                if entry is None:
                    entry = _OpenSlide(open_indexed_slide(row), row)
                    self._open[source_id] = entry
                else:
                    check_unchanged(row)
            except SlideChanged:
                self._open.pop(source_id, None)
                raise SlideChanged(f"slide {source_id} ({row.name}): the slide changed since it was "
                                   "indexed; index it again with `retrieve.py index ... --replace`") from None
            except slide_errors() as error:
                self._open.pop(source_id, None)
                raise NotFound(f"slide {source_id}: its file can no longer be read ({error})") from None
            self._open.move_to_end(source_id)
            # The least recently used go first; the one just used stays, however large.
            while len(self._open) > 1 and sum(kept.nbytes for kept in self._open.values()) > OPEN_SLIDE_BYTES:
                self._open.popitem(last=False)
            return entry

    def dzi(self, source_id: int) -> str:
        return self._slide(source_id).deep_zoom.get_dzi(TILE_FORMAT)

    def tile(self, source_id: int, level: int, col: int, row: int) -> bytes:
        entry = self._slide(source_id)
        zoom = entry.deep_zoom
        if not 0 <= level < zoom.level_count:
            raise NotFound(f"slide {source_id}: no Deep Zoom level {level} (it has {zoom.level_count})")
        cols, rows = zoom.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(f"slide {source_id}: no tile {col}_{row} at level {level} ({cols} x {rows} tiles)")
        try:
            tile = zoom.get_tile(level, (col, row))  # tiffslide and Pillow reads take turns in Slide.read
        except slide_errors() as error:
            raise NotFound(f"slide {source_id}: tile {level}/{col}_{row} cannot be read ({error})") from None
        return jpeg_bytes(tile, TILE_QUALITY)

    # ------------------------------------------------------------------ searches
    def search_upload(self, upload: bytes | BinaryIO, filename: str | None, top_k: int | None = None) -> Search:
        """Search with an uploaded patch image, held in memory: cut by the index's input steps as a
        query of the same file is. The file name is a label only; its `<class>_` prefix, when the index
        knows the class, judges the matches."""
        name = upload_label(filename)
        crop, preview = decode_upload(upload, name, self.index.settings.input_steps)
        result = self._search(Job.of_pixels(crop, name, cropped=True), top_k)
        return self._keep(Search(uuid.uuid4().hex, "upload", name, result, preview=jpeg_bytes(preview)))

    def search_region(self, source_id: int, box: tuple[int, int, int, int], top_k: int | None = None) -> Search:
        """Search with a level-0 region of an indexed slide, tiled into the index's patches."""
        row = self.source(source_id, "slide")
        x, y, width, height = box
        if width < 1 or height < 1 or x < 0 or y < 0 or x + width > row.width or y + height > row.height:
            raise BadInput(f"region {x},{y},{width},{height}: must lie inside the slide ({row.width} x "
                           f"{row.height} level-0 pixels) and have a positive size")
        side = self.index.settings.patch_size * self.index.settings.mpp / row.slide_mpp
        patches = max(1, round(width / side)) * max(1, round(height / side))
        if patches > MAX_REGION_PATCHES:
            raise BadInput(f"region {x},{y},{width},{height}: about {patches} patches; draw a smaller region (at "
                           f"most {MAX_REGION_PATCHES} patches of {side:.0f} level-0 pixels)", too_large=True)
        entry = self._slide(source_id)  # the indexed file, through its open handle, or SlideChanged
        result = self._search(Job(row.path, "region", region=(x, y, width, height)), top_k, row.slide_mpp,
                              entry.lend)
        preview = query_pixels(result, self.index, entry.lend)
        name = f"{row.name} @ {x},{y},{width},{height}"
        return self._keep(Search(uuid.uuid4().hex, "region", name, result, source_id,
                                 None if preview is None else jpeg_bytes(preview)))

    def _search(self, job: Job, top_k: int | None, slide_mpp: float | None = None,
                opener: SlideOpener = open_slide) -> QueryResult:
        top_k = top_k or self.top_k
        if not 1 <= top_k <= 100:
            raise BadInput(f"top_k {top_k}: choose from 1 to 100")
        with self.lock:
            results, failed = run_queries(self.index, [job], self.embedder, top_k, out_dir=None,
                                          fallback_mpp=slide_mpp, nprobe=self.nprobe,
                                          ef_search=self.ef_search, progress=False, opener=opener)
        if not results:
            reason = failed[0][1] if failed else "no patch to search with"
            raise BadInput(f"{Path(job.path).name}: cannot be searched with ({reason})")
        return results[0]

    def _keep(self, search: Search) -> Search:
        with self.lock:
            self._searches[search.id] = search
            while len(self._searches) > KEPT_SEARCHES:
                self._searches.popitem(last=False)
        return search

    def search(self, search_id: str) -> Search:
        with self.lock:
            found = self._searches.get(search_id)
        if found is None:
            raise NotFound(f"search {search_id}: not kept any more (the page keeps the last {KEPT_SEARCHES}); "
                           "search again")
        return found

    def matches(self, search: Search) -> list[Match]:
        """Every match of the search's patches, best first, each indexed patch once, ranked among them."""
        return best_matches(search.result)

    def slide_ranking(self, search: Search) -> list[SlideRank]:
        """The search's ranking of the slides the index still holds."""
        sources = self.sources_by_id(slide.source_id for slide in search.result.slides)
        return [slide for slide in search.result.slides if slide.source_id in sources]

    def similar_slides(self, source_id: int, top: int = SIMILAR_SLIDES) -> tuple[int, list[SlideRank]]:
        """(the slide's query patches, the `top` other slides ranked for it) as `retrieve.py query` of the
        slide ranks them, from the vectors the index holds (slide_evaluation.similar_slides): no pixel is
        read, so a slide whose file changed is still answered for what was indexed."""
        row = self.source(source_id)
        if row.kind != "slide":
            raise BadInput(f"source {source_id} ({row.name}): a folder of patch images, not a slide; only an "
                           "indexed slide can be searched for similar slides")
        if not 1 <= top <= 100:
            raise BadInput(f"top {top}: choose from 1 to 100")
        with self.lock:
            ranked = similar_slides(self.index, source_id, self.top_k, self.nprobe, self.ef_search)
        sources = self.sources_by_id(slide.source_id for slide in ranked)
        return row.patch_count, [slide for slide in ranked if slide.source_id in sources][:top]

    def heatmap(self, search_id: str, source_id: int) -> tuple[bytes, float, float]:
        """A PNG the size of the slide's thumbnail, each indexed patch coloured by its similarity to
        the closest query patch (transparent elsewhere), and the similarity range it spans."""
        search = self.search(search_id)
        self.source(source_id, "slide")
        with self.lock:
            ids, heat = slide_heat(self.index, source_id, search.result.vectors)
            patches = self.index.patches(ids)
            thumbnail = self.index.thumbnail(source_id)
        downsample = thumbnail.downsample
        with Image.open(io.BytesIO(thumbnail.jpeg)) as image:  # its size, from the JPEG's header
            width, height = image.size
        low, high, colours = heat_colours(heat)
        canvas = np.zeros((height, width, 4), np.uint8)
        for patch_id, colour in zip(ids.tolist(), colours):
            p = patches[patch_id]
            x0, y0 = int(p.x / downsample), int(p.y / downsample)
            x1, y1 = max(x0 + 1, round((p.x + p.width) / downsample)), max(y0 + 1, round((p.y + p.height) / downsample))
            canvas[y0:y1, x0:x1, :3] = np.round(colour[:3] * 255)
            canvas[y0:y1, x0:x1, 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(canvas, "RGBA").save(buffer, "PNG")
        return buffer.getvalue(), low, high
