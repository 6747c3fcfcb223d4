"""SlideIndex and PatchDatabase (histo_retrieval.search.index): ids never given twice, the rows they
answer with (SourceRow, Patch, Thumbnail), generations and the faiss index kept current with the
database, removing sources, torchrun shards merged, and an indexed slide's file checked before use."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from histo_retrieval.search.index import (IndexSettings, Patch, PatchDatabase, SlideChanged, SlideIndex, SourceRecord,
                                          SourceRow, Thumbnail, check_unchanged, file_stat, open_indexed_slide)
from histo_retrieval.search.slides import SlideError

SETTINGS = IndexSettings("model.pth", "0" * 64, "m", {}, 32, 4, 1.0, 32, 0.5)


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, 4)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def slide_record(path: str, vectors: np.ndarray, **info) -> SourceRecord:
    """A slide source of len(vectors) patches in a row, 64 level-0 pixels each."""
    boxes = np.array([[64 * i, 0, 64, 64] for i in range(len(vectors))], np.int64).reshape(-1, 4)
    return SourceRecord(path, "slide", vectors, boxes, file_size=1, mtime=1.0, **info)


def test_failed_sources_and_merged_shards_take_ids_never_given_before(tmp_path):
    def record(path: str) -> SourceRecord:
        return SourceRecord(path, "slide", np.eye(4, dtype=np.float32)[:2], np.zeros((2, 4), np.int64),
                            file_size=1, mtime=1.0)

    given = []
    with SlideIndex.create(tmp_path / "index", SETTINGS) as index:
        given.append(index.add(record("/a")))
        index.add_failure("/broken", "unreadable")
        given.append(index.source_by_path("/broken").id)
        index.add_failure("/broken", "still unreadable")  # retried: the same record
        assert index.source_by_path("/broken").id == given[-1]
        given.append(index.add(record("/b")))
        index.remove(given[-1])
        given.append(index.add(record("/broken")))  # indexed at last: its failed record goes
        index.remove(given[-1])
    (tmp_path / "index" / "shards").mkdir()
    shard = PatchDatabase(tmp_path / "index" / "shards" / "rank000.sqlite")  # left by a torchrun process
    shard.add_source(record("/c"))
    shard.add_failure("/d", "unreadable")
    shard.close()
    with SlideIndex.open(tmp_path / "index", writable=True) as index:  # merges the shard
        given += [index.source_by_path(path).id for path in ("/c", "/d")]
        given.append(index.add(record("/e")))
    assert given == sorted(set(given)), given


def test_sources_patches_and_thumbnails_come_back_as_their_rows(tmp_path):
    vectors = unit_rows(5)
    with SlideIndex.create(tmp_path / "index", SETTINGS) as index:
        slide_id = index.add(SourceRecord(
            "/s/a.svs", "slide", vectors[:3], np.array([[0, 0, 64, 64], [64, 0, 64, 64], [128, 0, 64, 64]]),
            tissue=np.array([0.5, 0.75, 1.0], np.float32), file_size=10, mtime=2.5, width=192, height=64,
            slide_mpp=0.5, backend="openslide", thumbnail=b"jpeg bytes", thumbnail_downsample=16.0))
        folder_id = index.add(SourceRecord("/p", "folder", vectors[3:], np.zeros((2, 4), np.int64),
                                           files=["/p/s0/a.png", "/p/b.png"], classes=["s0", None]))
        index.add_failure("/s/broken.svs", "unreadable")

        slide, folder = index.sources()
        assert slide == SourceRow(slide_id, "/s/a.svs", "slide", "indexed", 10, 2.5, 192, 64, 0.5, "openslide", 1, 3,
                                  16.0, None, slide.indexed_at)
        assert slide.name == "a.svs" and slide.indexed_at
        assert (folder.id, folder.kind, folder.first_patch, folder.patch_count, folder.width) == (folder_id, "folder",
                                                                                                  4, 2, None)
        [failed] = index.sources("failed")
        assert (failed.path, failed.kind, failed.state, failed.reason, failed.patch_count) == (
            "/s/broken.svs", "slide", "failed", "unreadable", 0)
        assert [row.path for row in index.sources(None)] == ["/s/a.svs", "/p", "/s/broken.svs"]
        assert index.source_by_path("/p") == folder and index.source_by_path("/nowhere") is None
        with pytest.raises(dataclasses.FrozenInstanceError):
            slide.path = "/elsewhere"

        assert index.thumbnail(slide_id) == Thumbnail(b"jpeg bytes", 16.0)
        assert index.thumbnail(folder_id) is None and index.thumbnail(999) is None

        assert index.patch_ids(slide_id).tolist() == [1, 2, 3] and index.patch_ids(folder_id).tolist() == [4, 5]
        patches = index.patches([2, 4, 5, 999])
        assert patches == {2: Patch(2, slide_id, "/s/a.svs", "slide", 64, 0, 64, 64, 0.75, None, None),
                           4: Patch(4, folder_id, "/p", "folder", 0, 0, 0, 0, None, "/p/s0/a.png", "s0"),
                           5: Patch(5, folder_id, "/p", "folder", 0, 0, 0, 0, None, "/p/b.png", None)}
        assert index.patches_of_files(["/p/b.png", "/p/c.png"]) == {"/p/b.png": 5}
        assert index.classes() == {"s0"} and index.patch_count() == 5
        ids, stored = index.source_vectors(folder_id)
        assert ids.tolist() == [4, 5] and np.array_equal(stored, vectors[3:])


def test_each_change_moves_the_generation_and_a_stale_faiss_file_is_rebuilt(tmp_path, capsys):
    vectors = unit_rows(6, seed=1)
    folder = tmp_path / "index"
    with SlideIndex.create(folder, SETTINGS) as index:
        assert index.generation == 0
        first = index.add(slide_record("/a", vectors[:3]))
        assert index.generation == 1
        index.add(slide_record("/b", vectors[3:]))
        assert index.generation == 2
        assert index.remove(first) == 3 and index.generation == 3
        assert index.source_by_path("/a") is None and index.patch_ids(first).tolist() == []
        _, ids = index.search(vectors[:1], 3)
        assert set(ids[0].tolist()) == {4, 5, 6}  # /a's patches 1-3 are gone
    assert json.loads((folder / "vectors.faiss.json").read_text()) == {"generation": 3}

    # A run killed after its commit, before saving vectors.faiss.
    shard = PatchDatabase(folder / "patches.sqlite", store=folder / "vectors", dim=4)
    shard.add_source(slide_record("/c", vectors[:3]))
    shard.close()
    capsys.readouterr()
    with SlideIndex.open(folder) as index:
        assert index.generation == 4 and index.vectors.ntotal == 6
        scores, ids = index.search(vectors[:1], 1)
        assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)  # /c's first patch, ids 7-9
    assert "rebuilding it from 6 stored vectors" in capsys.readouterr().out
    with SlideIndex.open(folder, writable=True) as index:
        assert index.vectors.ntotal == 6  # rebuilt and saved by a writer
    assert json.loads((folder / "vectors.faiss.json").read_text()) == {"generation": 4}


def test_shards_merge_into_the_index_once_and_are_deleted(tmp_path):
    vectors = unit_rows(6, seed=2)
    folder = tmp_path / "index"
    with SlideIndex.create(folder, SETTINGS) as index:
        index.add(slide_record("/a", vectors[:2]))
    (folder / "shards").mkdir()
    for rank, (path, rows) in enumerate((("/a", vectors[2:4]), ("/b", vectors[4:6]))):
        shard = PatchDatabase(folder / "shards" / f"rank{rank:03d}.sqlite")
        shard.add_source(slide_record(path, rows, width=128, thumbnail=b"b's thumbnail", thumbnail_downsample=8.0))
        shard.close()
    with SlideIndex.open(folder, writable=True) as index:
        assert [row.path for row in index.sources()] == ["/a", "/b"]  # /a was indexed already: kept as it was
        a, b = index.sources()
        assert np.array_equal(index.source_vectors(a.id)[1], vectors[:2])
        ids, stored = index.source_vectors(b.id)
        assert np.array_equal(stored, vectors[4:6]) and (b.width, b.patch_count) == (128, 2)
        assert [(p.x, p.width) for p in index.patches(ids).values()] == [(0, 64), (64, 64)]
        assert index.thumbnail(b.id) == Thumbnail(b"b's thumbnail", 8.0)
        assert index.vectors.ntotal == 4 and index.merge_shards() == []
    assert list((folder / "shards").iterdir()) == []


def test_an_indexed_slide_is_opened_only_while_its_file_is_the_one_indexed(tmp_path):
    path = tmp_path / "slide.png"
    Image.fromarray(np.full((64, 96, 3), 180, np.uint8)).save(path)
    size, mtime = file_stat(path)
    row = SourceRow(1, str(path), "slide", "indexed", size, mtime, 96, 64, 0.5, "image", 1, 1, None, None, None)
    check_unchanged(row)
    with open_indexed_slide(row) as slide:
        assert slide.dimensions == (96, 64) and slide.mpp == 0.5
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(SlideChanged, match=r"slide\.png: the slide changed since it was indexed.*--replace"):
        open_indexed_slide(row)
    path.unlink()
    with pytest.raises(SlideError, match=r"slide\.png: no such slide file"):
        check_unchanged(row)


# ----------------------------------------------------------------------------- the encoder in the manifest
OLD_MODEL = {"checkpoint": "/models/se_resnet50_MSLoss_0.5000.pth", "weights_sha256": "a" * 64,
             "model_name": "se_resnet50", "model_options": {"embedding_dim": 4}, "crop_size": 32, "embedding_dim": 4}


def old_manifest(**model) -> dict:
    """A manifest as indexes were written before encoders had names: a checkpoint, its crop size (in
    an index of today's storage, as `retrieve.py upgrade` leaves one: it keeps the model record)."""
    return {"format": 2, "model": {**OLD_MODEL, **model}, "tiling": {"mpp": 0.5, "patch_size": 32,
                                                                     "tissue_threshold": 0.5},
            "vector_index": {"type": "flat", "ivf_lists": None, "hnsw_m": 32}, "created": "", "command": ""}


def test_an_old_manifest_reads_as_its_checkpoint_cut_by_the_plain_crop(tmp_path):
    from histo_retrieval.data.datasets import InputSteps

    settings = IndexSettings.from_manifest(old_manifest(note="kept"))
    assert (settings.spec, settings.kind, settings.checkpoint) == (OLD_MODEL["checkpoint"], "checkpoint",
                                                                   OLD_MODEL["checkpoint"])
    assert settings.input_steps == InputSteps(32) and settings.preprocessing is None
    assert settings.extra == {"note": "kept"}
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(old_manifest()))
    with SlideIndex.open(tmp_path / "index", writable=True) as index:
        assert index.settings.input_steps == InputSteps(32) and index.patch_count() == 0
    # A run with the same weights, moved, and a normalisation of its own adds to it: the hash is the identity.
    same = dataclasses.replace(settings, checkpoint="/elsewhere/model.pth", spec="/elsewhere/model.pth",
                               preprocessing={"mean": None, "std": None, "stain": None}, extra={})
    assert settings.differences(same) == []
    rewritten = same.manifest()["model"]
    assert (rewritten["checkpoint"], rewritten["weights"], rewritten["input_steps"]) == (
        "/elsewhere/model.pth", "/elsewhere/model.pth", {"crop_size": 32, "resize": None, "interpolation": "bilinear"})


def test_the_manifest_records_a_timm_encoder_and_reads_it_back(tmp_path):
    from histo_retrieval.encoders import load_encoder
    from histo_retrieval.search.slides import Tiling

    encoder = load_encoder("timm:vit_tiny_patch16_224", weights="random", options={"depth": 1})
    settings = IndexSettings.for_model(encoder, Tiling(0.5, 224, 0.5))
    model = settings.manifest()["model"]
    assert {k: model[k] for k in ("spec", "kind", "weights", "model_name", "model_options", "crop_size", "pooling",
                                  "mpp", "embedding_dim")} == {
        "spec": "timm:vit_tiny_patch16_224", "kind": "timm", "weights": "random", "model_name": "vit_tiny_patch16_224",
        "model_options": {"depth": 1}, "crop_size": 224, "pooling": "pooled", "mpp": None, "embedding_dim": 192}
    assert model["input_steps"] == encoder.input_steps.to_dict() == {"crop_size": 224, "resize": 248,
                                                                     "interpolation": "bicubic"}
    assert model["preprocessing"] == encoder.preprocessing.to_dict() and "checkpoint" not in model
    assert model["weights_sha256"] == encoder.weights_sha256()
    read = IndexSettings.from_manifest(json.loads(json.dumps(settings.manifest())))
    assert read == settings and read.differences(settings) == []
    other = IndexSettings.for_model(load_encoder("histogram"), Tiling(0.5, 224, 0.5))
    assert [line.split(" (the index has")[0] for line in settings.differences(other)] == [
        "--encoder histogram (histogram)", f"weights (model hash) {other.weights_sha256}", "model histogram",
        "model options {'bins': 8, 'crop_size': 224}", "input steps centre crop 224 px",
        f"normalisation {other.preprocessing}"]
