"""retrieve.py over folders of patches: the index folder, queries against a naive search, growing
and shrinking the index, refusals and the old single-file index's message."""
import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
from histo_retrieval.encoders.project import load_model
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.search.index import SlideIndex

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    return [*argv, "--device", "cpu", "--workers", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, make_images, write_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("retrieve")
    images = root / "images"
    make_images(images, {"s0": 3, "s1": 3}, seed=5)
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(images / "loose.png")  # no class folder
    (images / "s1" / "s1_corrupt.png").write_bytes(b"broken")
    make_images(root / "queries", {"s1": 1}, seed=6)
    checkpoint = root / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    index = root / "index"
    assert run(*cpu("index", str(checkpoint), str(images), "--index", str(index))) == 1  # the corrupt image
    return {"root": root, "images": images, "checkpoint": checkpoint, "index": index}


def stored(index_dir: Path) -> tuple[list[tuple], np.ndarray]:
    """(file, class) per patch in id order, read straight from the database, and their stored vectors."""
    with sqlite3.connect(index_dir / "patches.sqlite") as db:
        rows = db.execute("SELECT file, class FROM patches ORDER BY id").fetchall()
    with SlideIndex.open(index_dir) as index:
        return rows, np.concatenate([index.source_vectors(source.id)[1] for source in index.sources()])


def naive_vectors(checkpoint: Path, paths: list[str]) -> np.ndarray:
    loaded = load_model(checkpoint, "cpu")
    vectors, kept, failed = Embedder(loaded.model, "cpu", 4).embed_files(paths, loaded.crop_size)
    assert kept == list(range(len(paths))) and not failed
    return vectors.numpy()


def test_index_folder_holds_every_readable_patch_with_its_class_and_vector(collection):
    images = collection["images"]
    rows, vectors = stored(collection["index"])
    names = ["loose.png", "s0/s0_0.png", "s0/s0_1.png", "s0/s0_2.png", "s1/s1_0.png", "s1/s1_1.png", "s1/s1_2.png"]
    assert rows == [(str((images / n).resolve()), n.split("/")[0] if "/" in n else None) for n in names]
    np.testing.assert_allclose(vectors, naive_vectors(collection["checkpoint"], [r[0] for r in rows]), atol=1e-5)
    manifest = json.loads((collection["index"] / "manifest.json").read_text())
    assert manifest["model"]["model_name"] == "se_resnet50" and manifest["model"]["crop_size"] == 32
    assert manifest["model"]["embedding_dim"] == 512 and len(manifest["model"]["weights_sha256"]) == 64
    assert manifest["tiling"]["patch_size"] == 32 and manifest["vector_index"]["type"] == "flat"
    assert "retrieve.py" in manifest["command"] or "pytest" in manifest["command"]


def test_query_matches_a_naive_search_and_never_returns_itself(collection, tmp_path):
    inside = str((collection["images"] / "s0" / "s0_1.png").resolve())
    out = tmp_path / "out"
    assert run(*cpu("query", "--index", str(collection["index"]), inside, str(collection["root"] / "queries"),
                    "--top-k", "3", "--out-dir", str(out))) == 0
    rows, vectors = stored(collection["index"])
    files = [r[0] for r in rows]
    query_vectors = naive_vectors(collection["checkpoint"], [inside])
    scores = vectors @ query_vectors[0]
    scores[files.index(inside)] = -np.inf  # never itself
    expected = [files[i] for i in np.argsort(-scores, kind="stable")[:3]]
    with open(out / "matches.csv", newline="") as f:
        matches = list(csv.DictReader(f))
    first = [m for m in matches if m["query"] == inside]
    assert [m["file"] for m in first] == expected and [m["rank"] for m in first] == ["1", "2", "3"]
    assert [float(m["similarity"]) for m in first] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)
    assert first[0]["query_class"] == "s0" and first[0]["class"] in ("s0", "s1", "")
    assert len(matches) == 6 and sorted(p.name for p in out.glob("*.png")) == ["000_s0_1.png", "001_s1_0.png"]
    with open(out / "slides.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []  # a folder of patches is not a slide to rank
    assert json.loads((out / "query.json").read_text())["top_k"] == 3


def test_unreadable_query_is_reported_and_exit_1(collection, tmp_path, capsys):
    capsys.readouterr()
    broken = tmp_path / "s0_broken.png"
    broken.write_bytes(b"not a png")
    good = str((collection["images"] / "s0" / "s0_0.png").resolve())
    assert run(*cpu("query", "--index", str(collection["index"]), good, str(broken), "--top-k", "2",
                    "--out-dir", str(tmp_path / "out"))) == 1
    out, err = capsys.readouterr()
    assert f"query {good} (patch" in out
    assert "1 unreadable image(s) were left out:" in err and f"  {broken} (" in err
    with open(tmp_path / "out" / "matches.csv", newline="") as f:
        assert {row["query"] for row in csv.DictReader(f)} == {good}


def test_channels_last_index_gives_the_same_vectors(collection, tmp_path):
    other = tmp_path / "nhwc"
    assert run(*cpu("index", str(collection["checkpoint"]), str(collection["images"]), "--index", str(other),
                    "--channels-last")) == 1
    np.testing.assert_allclose(stored(other)[1], stored(collection["index"])[1], atol=1e-5)


def test_remove_readd_and_replace_leave_no_duplicates_or_orphans(collection, tmp_path, make_images, capsys):
    index = tmp_path / "grow"
    extra = tmp_path / "extra"
    make_images(extra, {"s2": 2}, seed=9)
    checkpoint, images = str(collection["checkpoint"]), str(collection["images"])
    assert run(*cpu("index", checkpoint, images, str(extra), "--index", str(index))) == 1
    assert run(*cpu("index", checkpoint, images, "--index", str(index))) == 0  # already there: skipped
    assert "already indexed (7 patches), skipped" in capsys.readouterr().out

    def counts() -> tuple:
        """Patches, distinct files, orphan patches, and the live vectors of the store."""
        with sqlite3.connect(index / "patches.sqlite") as db:
            patches = (db.execute("SELECT COUNT(*) FROM patches").fetchone()[0],
                       db.execute("SELECT COUNT(DISTINCT file) FROM patches").fetchone()[0],
                       db.execute("SELECT COUNT(*) FROM patches WHERE source_id NOT IN (SELECT id FROM sources)").fetchone()[0])
        with SlideIndex.open(index) as opened:
            return (*patches, opened.store_stats().live_rows)

    assert counts() == (9, 9, 0, 9)
    assert run("remove", "--index", str(index), str(extra)) == 0
    assert counts() == (7, 7, 0, 7)
    with SlideIndex.open(index) as opened:
        assert opened.vectors.ntotal == 7
    assert run(*cpu("index", checkpoint, str(extra), "--index", str(index))) == 0
    assert run(*cpu("index", checkpoint, str(extra), "--index", str(index), "--replace")) == 0
    assert counts() == (9, 9, 0, 9)
    with SlideIndex.open(index) as opened:
        assert opened.vectors.ntotal == 9
        ids = set(int(i) for i in __import__("histo_retrieval.search.vector_index", fromlist=["x"]).index_ids(opened.vectors))
        assert ids == {int(i) for s in opened.sources() for i in opened.patch_ids(s.id)}
    assert run("remove", "--index", str(index), str(tmp_path / "never")) == 1
    assert "not in the index" in capsys.readouterr().err
    assert run("list", "--index", str(index)) == 0
    listing = capsys.readouterr().out
    assert "9 patches in 2 source(s)" in listing and str(extra.resolve()) in listing


def test_an_index_refuses_another_model_and_another_scale(collection, tmp_path, write_checkpoint):
    other = tmp_path / "se_resnet50_other.pth"
    write_checkpoint(other, "se_resnet50", crop_size=32, seed=1, attention=False)
    with pytest.raises(retrieve.UserError, match=r"other settings.*weights \(model hash\)"):
        run(*cpu("index", str(other), str(collection["images"]), "--index", str(collection["index"])))
    with pytest.raises(retrieve.UserError, match=r"--mpp 0\.25 \(the index has 0\.5\)"):
        run(*cpu("index", str(collection["checkpoint"]), str(collection["images"]), "--index",
                 str(collection["index"]), "--mpp", "0.25"))
    with pytest.raises(retrieve.UserError, match="not the weights this index was built with"):
        run(*cpu("query", "--index", str(collection["index"]), str(collection["images"]), "--checkpoint", str(other),
                 "--out-dir", str(tmp_path / "q")))


def test_an_index_from_before_named_encoders_still_queries_lists_and_grows(collection, tmp_path, make_images,
                                                                          capsys):
    """A manifest without spec, kind, weights, input steps or normalisation: its checkpoint, cut by the
    plain centre crop, as it was built."""
    old = tmp_path / "old_index"
    shutil.copytree(collection["index"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model"] = {k: manifest["model"][k] for k in ("checkpoint", "weights_sha256", "model_name",
                                                           "model_options", "crop_size", "embedding_dim")}
    (old / "manifest.json").write_text(json.dumps(manifest))
    query = str(collection["images"] / "s0" / "s0_0.png")
    assert run(*cpu("query", "--index", str(old), query, "--out-dir", str(tmp_path / "old"))) == 0
    assert run(*cpu("query", "--index", str(collection["index"]), query, "--out-dir", str(tmp_path / "new"))) == 0
    assert (tmp_path / "old" / "matches.csv").read_text() == (tmp_path / "new" / "matches.csv").read_text()
    capsys.readouterr()
    assert run("list", "--index", str(old)) == 0
    assert f"{collection['checkpoint']} (se_resnet50" in capsys.readouterr().out
    make_images(tmp_path / "more", {"s2": 1}, seed=11)
    assert run(*cpu("index", str(collection["checkpoint"]), str(tmp_path / "more"), "--index", str(old))) == 0


def runs_logged(index_dir: Path) -> int:
    with sqlite3.connect(index_dir / "patches.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def test_index_of_sources_that_are_not_there_creates_nothing(collection, tmp_path):
    checkpoint, index = str(collection["checkpoint"]), tmp_path / "new_index"
    with pytest.raises(retrieve.UserError, match=r"missing\.svs: no such slide, image or folder; nothing to index, "
                                                 r"so no index folder was created or changed"):
        run(*cpu("index", checkpoint, str(tmp_path / "missing.svs"), "--index", str(index)))
    assert not index.exists()
    with pytest.raises(retrieve.UserError, match=r"a\.svs, .*b: none of these slides, images or folders exists"):
        run(*cpu("index", checkpoint, str(tmp_path / "a.svs"), str(tmp_path / "b"), "--index", str(index)))
    assert not index.exists()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(retrieve.UserError, match="bad.pth"):
        run(*cpu("index", str(bad), str(collection["images"]), "--index", str(index)))
    assert not index.exists()
    # An index that exists is left as it was: not even the run is logged.
    runs = runs_logged(collection["index"])
    with pytest.raises(retrieve.UserError, match="no such slide, image or folder"):
        run(*cpu("index", checkpoint, str(tmp_path / "missing.svs"), "--index", str(collection["index"])))
    assert runs_logged(collection["index"]) == runs


def test_a_missing_source_among_others_is_skipped_and_reported_with_exit_1(collection, tmp_path, make_images,
                                                                          capsys):
    extra, index = tmp_path / "extra", tmp_path / "mixed"
    make_images(extra, {"s2": 2}, seed=9)
    missing = tmp_path / "typo.svs"
    capsys.readouterr()
    assert run(*cpu("index", str(collection["checkpoint"]), str(missing), str(extra), "--index", str(index))) == 1
    out, err = capsys.readouterr()
    assert "indexed 1 source(s), 2 patches" in out
    assert "1 source(s) could not be indexed:" in err and f"  {missing} (no such slide, image or folder)" in err
    assert len(stored(index)[0]) == 2
    assert run("list", "--index", str(index), "--failed") == 0
    assert str(missing) not in capsys.readouterr().out  # not there is not a failed slide to retry: not recorded


def test_query_on_an_index_with_no_patches_says_so_and_writes_nothing(collection, tmp_path, capsys):
    unreadable, corrupt = tmp_path / "unreadable", tmp_path / "corrupt.svs"
    (unreadable / "s0").mkdir(parents=True)
    (unreadable / "s0" / "s0_0.png").write_bytes(b"not a png")
    corrupt.write_bytes(b"not a slide")
    query = str(collection["images"] / "s0" / "s0_0.png")
    for source, index, failed in ((unreadable, tmp_path / "empty1", ""),
                                  (corrupt, tmp_path / "empty2", r" \(1 source\(s\) failed: `python3 retrieve\.py list "
                                                                 r"--index .*empty2 --failed` says why\)")):
        assert run(*cpu("index", str(collection["checkpoint"]), str(source), "--index", str(index))) == 1
        out_dir = tmp_path / f"out_{index.name}"
        capsys.readouterr()
        with pytest.raises(retrieve.UserError,
                           match=rf"^{re.escape(str(index))}: the index is empty, no patches to search{failed}; add "
                                 rf"sources with `python3 retrieve\.py index CHECKPOINT SOURCE\.\.\. --index "
                                 rf"{re.escape(str(index))}`$"):
            run(*cpu("query", "--index", str(index), query, "--out-dir", str(out_dir)))
        assert not out_dir.exists()
        assert capsys.readouterr().out == ""


def test_old_single_file_index_gets_a_rebuild_message(collection, tmp_path):
    old = tmp_path / "index.pt"
    torch.save({"format": 1, "embeddings": torch.zeros(1, 4)}, old)
    with pytest.raises(retrieve.UserError, match=r"index\.pt: an index file of the old format.*--index DIR"):
        run(*cpu("query", str(old), str(collection["images"])))
    with pytest.raises(retrieve.UserError, match="an index file of the old format"):
        run(*cpu("query", "--index", str(old), str(collection["images"])))
    with pytest.raises(retrieve.UserError, match=r"--out index\.pt: indexes are now folders"):
        run(*cpu("index", str(collection["checkpoint"]), str(collection["images"]), "--out", "index.pt"))


def test_grid_frames_right_matches_green_and_wrong_ones_red(collection, tmp_path):
    query = str((collection["images"] / "s0" / "s0_1.png").resolve())
    assert run(*cpu("query", "--index", str(collection["index"]), query, "--top-k", "6",
                    "--out-dir", str(tmp_path))) == 0
    pixels = np.asarray(Image.open(tmp_path / "000_s0_1.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (0, 128, 0) in colours and (255, 0, 0) in colours


@pytest.mark.slow
def test_script_rejects_a_folder_that_is_not_an_index(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "retrieve.py"), "query", "--index", str(tmp_path), "x.png"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "not an index folder" in result.stderr
