"""Sources to embedded patches (histo_retrieval.search.indexing): EmbeddingRun's steps (plan, read,
finish) and their progress lines, a source that fails while it is read, images in memory read as
their saved files would be, and build_index's protocol (create or add, refuse other settings)."""
from __future__ import annotations

import re
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from histo_retrieval.data.datasets import eval_crop
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import IndexSettings, SlideIndex
from histo_retrieval.search.indexing import (MISSING, EmbeddingProgress, EmbeddingRun, Job, ChunkReader, build_index,
                                             embed_sources)
from histo_retrieval.search.slides import SlideError, Tiling, open_slide

CROP = 32
TILING = Tiling(mpp=1.0, patch_size=32, tissue_threshold=0.0)  # every patch kept


class MeanEmbedder:
    """Stands in for the model: a crop's vector is its three channel means; `calls` the batch sizes."""

    def __init__(self, batch_size: int = 4) -> None:
        self.batch_size, self.calls = batch_size, []

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return images.float().mean(dim=(2, 3))


class PixelEmbedder(MeanEmbedder):
    """A crop's vector is the crop itself: equal vectors, equal crops."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return images.flatten(1).float()


def means(paths) -> np.ndarray:
    return np.stack([eval_crop(CROP)(Image.open(p).convert("RGB")).float().mean(dim=(1, 2)).numpy() for p in paths])


@pytest.fixture
def material(tmp_path, make_images) -> dict:
    """A plain image read as a slide of 4 x 3 patches (at --slide-mpp 1.0), and a folder of 3 patch
    images with an unreadable one among them."""
    slide = tmp_path / "page.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(slide)
    make_images(tmp_path / "images", {"s0": 2, "s1": 1}, size=40)
    (tmp_path / "images" / "s0" / "s0_1b.png").write_bytes(b"not a png")
    files = tuple(str(p) for p in sorted((tmp_path / "images").rglob("*.png")))
    return {"slide": str(slide), "folder": str(tmp_path / "images"), "files": files,
            "classes": tuple(p.split("/")[-2] for p in files)}


def test_plan_lays_each_job_out_in_chunks_of_the_batch_size(material, tmp_path):
    pixels = np.zeros((40, 40, 3), np.uint8)
    jobs = [Job(material["slide"], "slide"), Job(str(tmp_path / "gone.svs"), "slide"),
            Job(material["folder"], "files", files=material["files"]), Job.of_pixels(pixels, "s1_upload.png")]
    run = EmbeddingRun(jobs, MeanEmbedder(batch_size=5), TILING, fallback_mpp=1.0)
    chunks = list(run.plan())
    assert [(c.job_number, c.kind, c.start, len(c.positions)) for c in chunks] == [
        (0, "slide", 0, 5), (0, "slide", 5, 5), (0, "slide", 10, 2), (2, "files", 0, 4), (3, "pixels", 0, 1)]
    assert chunks[1].positions[0] == (32, 32, 32, 32) and chunks[3].positions == material["files"]
    assert chunks[4].positions[0] is pixels and run.progress.bar.total == 12 + 4 + 1
    gone = run.finish(1)  # a job that could not be laid out: no chunk, and why
    assert "gone.svs: no such slide file" in gone.error and gone.boxes.shape == (0, 4) and len(gone.vectors) == 0


def test_read_and_finish_keep_each_readable_patch_in_plan_order(material):
    job = Job(material["folder"], "files", files=material["files"], classes=material["classes"])
    embedder = MeanEmbedder(batch_size=2)
    run = EmbeddingRun([job], embedder, TILING)
    reader = ChunkReader(CROP)
    for chunk in run.plan():
        run.read(reader[chunk])
    assert embedder.calls == [2, 1]  # the broken file (third) is not embedded
    assert list(run.finish_before(0)) == [] and run.finished == 0
    [result] = run.finish_before(1)
    readable = [f for f in material["files"] if not f.endswith("s0_1b.png")]
    assert result.error is None and result.files == readable and result.classes == ["s0", "s0", "s1"]
    assert result.failed == [(material["files"][2], result.failed[0][1])] and result.failed[0][1]
    np.testing.assert_allclose(result.vectors, means(readable), rtol=1e-6)
    assert result.boxes.shape == (3, 4) and result.record().kind == "folder"


def test_a_source_that_fails_while_it_is_read_gives_nothing_and_the_next_is_indexed(material, capsys):
    reads = iter(range(1000))

    def opener(path, fallback_mpp):
        slide = open_slide(path, fallback_mpp)
        if opener.opened:  # the reader's handle (the first is the sampler's, laying the slide out)
            real = slide.read

            def read(*args):
                if next(reads) == 5:  # one tile, in the second chunk, cannot be decoded
                    raise SlideError(f"{path}: a tile cannot be decoded")
                return real(*args)

            slide.read = read
        opener.opened += 1
        return slide

    opener.opened = 0
    embedder = MeanEmbedder(batch_size=4)
    jobs = [Job(material["slide"], "slide"), Job(material["folder"], "files", files=material["files"])]
    failed, folder = embed_sources(jobs, embedder, TILING, CROP, fallback_mpp=1.0, opener=opener)
    assert failed.error == f"SlideError: {material['slide']}: a tile cannot be decoded"
    assert (failed.boxes.shape, failed.vectors.shape, len(failed.tissue)) == ((0, 4), (0, 3), 0)
    assert embedder.calls[:1] == [4]  # the first chunk was embedded; the third, read after the error, was not
    assert folder.error is None and len(folder.boxes) == 3 and sum(embedder.calls) == 4 + 3
    err = capsys.readouterr().err
    assert f"page.png: failed: SlideError: {material['slide']}: a tile cannot be decoded" in err
    assert any(line.startswith("images: 3 patches in ") for line in re.split(r"[\r\n]", err))


def test_progress_lines_are_shown_or_not_at_all(material, capsys):
    job = Job(material["folder"], "files", files=material["files"])
    list(embed_sources([job, job], MeanEmbedder(), TILING, CROP, progress=False))
    assert capsys.readouterr().err == ""
    progress = EmbeddingProgress(jobs=2)
    run = EmbeddingRun([job, job], MeanEmbedder(), TILING, progress=progress)
    reader = ChunkReader(CROP)
    for chunk in run.plan():
        run.read(reader[chunk])
    first = run.finish(0)
    assert "1/2 sources, about" in progress.bar.postfix and progress.bar.n == 8
    run.finish(1)
    progress.close()
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("images: ")]
    assert len(lines) == 2 and lines[0].startswith(f"images: 3 patches in {first.seconds:.1f} s")


@pytest.mark.parametrize("height, width", [(32, 32), (41, 50), (28, 20)])  # the crop, larger, smaller (padded)
def test_an_image_in_memory_is_read_as_its_saved_file_would_be(tmp_path, height, width):
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), np.uint8)
    saved = tmp_path / "s0_query.png"
    Image.fromarray(pixels).save(saved)
    from_file, in_memory = embed_sources([Job(str(saved), "files", files=(str(saved),)),
                                          Job.of_pixels(pixels, "s0_query.png")], PixelEmbedder(), TILING, CROP,
                                         progress=False)
    assert in_memory.job.path == "s0_query.png" and in_memory.files == [] and in_memory.boxes.shape == (1, 4)
    assert np.array_equal(in_memory.vectors, from_file.vectors) and in_memory.vectors.shape == (1, 3 * CROP * CROP)


def test_a_pixels_job_takes_an_rgb_uint8_array_only():
    with pytest.raises(ValueError, match=r"upload\.png: pixels must be H x W x 3 uint8, got float32 \(8, 8, 3\)"):
        Job.of_pixels(np.zeros((8, 8, 3), np.float32), "upload.png")
    with pytest.raises(ValueError, match="pixels come with a job of kind 'pixels' only"):
        Job("x.png", "files", pixels=np.zeros((8, 8, 3), np.uint8))


def test_build_index_creates_adds_refuses_other_settings_and_reports_what_it_holds(tmp_path, make_images):
    make_images(tmp_path / "a", {"s0": 2, "s1": 1})
    make_images(tmp_path / "b", {"s2": 2}, seed=1)
    a, b, missing, index = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "typo.svs"), tmp_path / "index"
    settings = IndexSettings("model.pth", "0" * 64, "m", {}, CROP, 3, 1.0, 32, 0.5)

    with pytest.raises(UserError, match=r"typo\.svs: no such slide, image or folder; nothing to index"):
        build_index(index, [missing], settings, MeanEmbedder(), progress=False)
    assert not index.exists()

    report = build_index(index, [a, missing], settings, MeanEmbedder(), progress=False)
    assert (report.indexed, report.failed, report.skipped) == ([(a, 3)], [(missing, MISSING)], [])
    assert (report.held_sources, report.held_patches) == (1, 3)
    report = build_index(index, [a, b], settings, MeanEmbedder(), progress=False)
    assert (report.indexed, report.skipped, report.held_sources, report.held_patches) == ([(b, 2)], [a], 2, 5)
    with SlideIndex.open(index) as opened:
        folder = opened.source_by_path(b)
        files = sorted(str(p) for p in (tmp_path / "b").rglob("*.png"))
        np.testing.assert_allclose(opened.source_vectors(folder.id)[1], means(files), rtol=1e-6)

    with pytest.raises(UserError, match=r"this index was built with other settings; refusing to mix: --mpp 0\.25 "
                                        r"\(the index has 1\.0\)"):
        build_index(index, [a], IndexSettings(**{**settings.__dict__, "mpp": 0.25}), MeanEmbedder(), progress=False)
    with sqlite3.connect(index / "patches.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2  # the refused run left no trace
