"""retrieve.py: the index round trip, queries, the grid PNG and torch/faiss agreement."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import retrieve
from core.files import command_line

REPO = Path(__file__).resolve().parent.parent


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
    index_path = root / "index.pt"
    args = retrieve.get_args_parser().parse_args(
        ["index", str(checkpoint), str(images), "--out", str(index_path), "--device", "cpu", "--workers", "0",
         "--batch-size", "4"])
    assert retrieve.main(args) == 1  # the index is written, and the corrupt image reported
    return {"root": root, "images": images, "checkpoint": checkpoint, "index": index_path}


def test_index_round_trip(collection, capsys):
    index = retrieve.load_index(collection["index"])
    images = collection["images"]
    assert index["paths"] == [str((images / name).resolve()) for name in
                              ("loose.png", "s0/s0_0.png", "s0/s0_1.png", "s0/s0_2.png",
                               "s1/s1_0.png", "s1/s1_1.png", "s1/s1_2.png")]
    assert index["classes"] == [None, "s0", "s0", "s0", "s1", "s1", "s1"]
    assert [Path(p).name for p, _ in index["failed"]] == ["s1_corrupt.png"]
    assert index["embeddings"].shape == (7, 512) and index["embeddings"].dtype == torch.float32
    torch.testing.assert_close(index["embeddings"].norm(dim=1), torch.ones(7))
    assert index["model_name"] == "se_resnet50" and index["crop_size"] == 32
    assert index["model_options"]["attention"] is False and index["command"] == command_line()


def test_query_excludes_itself_ranks_by_similarity_and_writes_grids(collection, tmp_path):
    index = retrieve.load_index(collection["index"])
    inside = str(collection["images"] / "s0" / "s0_1.png")
    outside = str(collection["root"] / "queries" / "s1" / "s1_0.png")
    out_dir = tmp_path / "grids"
    args = retrieve.get_args_parser().parse_args(
        ["query", str(collection["index"]), inside, str(collection["root"] / "queries"), "--top-k", "3",
         "--out-dir", str(out_dir), "--device", "cpu", "--workers", "0"])
    assert retrieve.main(args) == 0
    results, failed = retrieve.run_query(index, [inside, outside], top_k=3, out_dir=None, device="cpu")
    assert failed == []

    assert [r["class"] for r in results] == ["s0", "s1"]
    own_row = index["paths"].index(str(Path(inside).resolve()))
    assert all(m["path"] != index["paths"][own_row] for m in results[0]["matches"])
    own = index["embeddings"][own_row]
    expected = sorted(((float(own @ e), p) for i, (e, p) in enumerate(zip(index["embeddings"], index["paths"]))
                       if i != own_row), reverse=True)[:3]
    for match, (similarity, path) in zip(results[0]["matches"], expected):
        assert match["path"] == path and match["similarity"] == pytest.approx(similarity, abs=1e-5)

    grids = sorted(out_dir.glob("*.png"))
    assert [g.name for g in grids] == ["000_s0_1.png", "001_s1_0.png"]
    width, height = Image.open(grids[0]).size
    assert width > 3 * height  # one row: the query and its three matches
    with open(out_dir / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert rows[0]["query_class"] == "s0" and rows[0]["command"] == command_line()


def test_unreadable_images_are_reported_and_exit_1(collection, tmp_path, capsys):
    capsys.readouterr()
    broken = tmp_path / "s0_broken.png"
    broken.write_bytes(b"not a png")
    good = str(collection["images"] / "s0" / "s0_0.png")
    args = retrieve.get_args_parser().parse_args(
        ["query", str(collection["index"]), good, str(broken), "--top-k", "2", "--out-dir", str(tmp_path / "out"),
         "--device", "cpu", "--workers", "0"])
    assert retrieve.main(args) == 1
    out, err = capsys.readouterr()
    assert f"query {good} (class s0)" in out and "s0_broken.png" not in out
    assert err.startswith("1 unreadable image(s) were left out:\n") and f"  {broken} (" in err
    with open(tmp_path / "out" / "matches.csv", newline="") as f:
        assert {row["query"] for row in csv.DictReader(f)} == {good}


def test_index_with_channels_last_gives_the_same_embeddings(collection, tmp_path):
    index = retrieve.load_index(collection["index"])
    nhwc = retrieve.build_index(collection["checkpoint"], collection["images"], batch_size=3, device="cpu",
                                channels_last=True)
    assert nhwc["paths"] == index["paths"] and nhwc["failed"] == index["failed"]
    torch.testing.assert_close(nhwc["embeddings"], index["embeddings"], atol=1e-5, rtol=0)
    args = retrieve.get_args_parser().parse_args(["index", "c.pth", "images", "--channels-last"])
    assert args.channels_last and args.workers == min(4, os.cpu_count() or 1)


def test_grid_frames_right_matches_green_and_wrong_ones_red(collection, tmp_path):
    images = collection["images"]
    matches = [{"rank": 1, "similarity": 0.9, "path": str(images / "s0" / "s0_0.png"), "class": "s0"},
               {"rank": 2, "similarity": 0.8, "path": str(images / "s1" / "s1_0.png"), "class": "s1"}]
    retrieve.draw_grid(tmp_path / "grid.png", str(images / "s0" / "s0_1.png"), "s0", matches)
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (0, 128, 0) in colours and (255, 0, 0) in colours


def test_faiss_and_torch_give_the_same_top_k():
    try:
        import faiss  # noqa: F401
    except ImportError:
        pytest.fail("this test needs faiss-cpu (listed in requirements.txt): pip install faiss-cpu")
    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(600, 32, generator=generator), dim=1)
    queries = torch.cat([gallery[[5, 17]], F.normalize(torch.randn(8, 32, generator=generator), dim=1)])
    exclude = torch.tensor([5, 17] + [-1] * 8)  # the first two queries are in the gallery
    torch_scores, torch_indices = retrieve.search(queries, gallery, 10, exclude)
    faiss_scores, faiss_indices = retrieve.search(queries, gallery, 10, exclude, use_faiss=True)
    torch.testing.assert_close(faiss_indices, torch_indices)
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-5, rtol=0)
    assert 5 not in torch_indices[0] and 17 not in torch_indices[1]


def test_faiss_option_without_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(retrieve.UserError, match="--faiss needs the faiss-cpu package: pip install faiss-cpu"):
        retrieve.search(torch.eye(3), torch.eye(3), 1, torch.tensor([-1, -1, -1]), use_faiss=True)


@pytest.mark.slow
def test_query_script_rejects_a_file_that_is_not_an_index(tmp_path):
    bogus = tmp_path / "index.pt"
    torch.save({"embeddings": torch.zeros(2, 2)}, bogus)
    image = tmp_path / "q.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    run = subprocess.run([sys.executable, "retrieve.py", "query", str(bogus), str(image)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {bogus}: not an index written by `python3 retrieve.py index`"
