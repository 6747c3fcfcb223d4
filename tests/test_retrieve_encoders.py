"""retrieve.py index/query/list and the search page with any encoder (--encoder): a timm architecture
from a weights file (vit_tiny_patch16_224, which resizes to 248 px then crops 224), a preset at a
reduced width, and the colour histogram. The vectors are timm's own, the manifest names the encoder,
and an index refuses another encoder or other weights."""
import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
from histo_retrieval.encoders import load_encoder
from histo_retrieval.errors import UserError
from histo_retrieval.search.index import SlideIndex
from histo_retrieval.search.queries import query_jobs, run_queries
from KIMIA_data import synthetic

ARCHITECTURE = "vit_tiny_patch16_224"
SPEC = f"timm:{ARCHITECTURE}"
MPP, PATCH = "1.0", "32"


def run(*argv: str) -> int:
    return retrieve.main(retrieve.get_args_parser().parse_args([*argv]))


def cpu(*argv: str) -> list[str]:
    return [*argv, "--device", "cpu", "--workers", "0", "--batch-size", "8"]


def timm_model(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0).eval()


def save_weights(path: Path, seed: int) -> Path:
    torch.save(timm_model(seed).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, make_images) -> dict:
    """A folder of patch images and a small synthetic slide (0.5 um/px), indexed with a timm encoder
    whose random weights are in a file."""
    root = tmp_path_factory.mktemp("encoders")
    make_images(root / "images", {"s0": 2, "s1": 2}, seed=5)
    records = synthetic.write_slide_set(root / "slides", count=1, classes=2, size=(768, 512), seed=3)
    slide = str(root / "slides" / records[0]["file"])
    weights = save_weights(root / "vit_tiny.pth", seed=1)
    index = root / "index"
    assert run(*cpu("index", "--encoder", SPEC, "--encoder-weights", str(weights), str(root / "images"), slide,
                    "--index", str(index), "--mpp", MPP, "--patch-size", PATCH)) == 0
    return {"root": root, "images": root / "images", "slide": slide, "weights": weights, "index": index}


def stored(index: Path) -> dict[str, np.ndarray]:
    with SlideIndex.open(index) as opened:
        return {source.path: opened.source_vectors(source.id)[1] for source in opened.sources()}


def first_match(out_dir: Path) -> dict:
    with open(out_dir / "matches.csv") as f:
        return next(csv.DictReader(f))


def test_the_manifest_names_the_encoder_its_input_steps_and_its_weights(archive):
    model = json.loads((archive["index"] / "manifest.json").read_text())["model"]
    expected = load_encoder(SPEC, weights=archive["weights"])
    assert (model["spec"], model["kind"], model["weights"], model["model_name"]) == (
        SPEC, "timm", str(archive["weights"].resolve()), ARCHITECTURE)
    assert model["input_steps"] == {"crop_size": 224, "resize": 248, "interpolation": "bicubic"}
    assert model["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and model["pooling"] == "pooled"
    assert model["weights_sha256"] == expected.weights_sha256() and model["embedding_dim"] == 192
    assert "checkpoint" not in model and model["mpp"] is None


def test_a_folders_vectors_are_timms_own_forward_of_each_file(archive):
    """timm's eval transform (resize 248 bicubic, crop 224, mean and std) and forward, L2-normalised."""
    from timm.data import create_transform, resolve_data_config

    model = timm_model(seed=1)
    transform = create_transform(**resolve_data_config({}, model=model))
    with sqlite3.connect(archive["index"] / "patches.sqlite") as db:
        files = [row[0] for row in db.execute("SELECT file FROM patches WHERE file IS NOT NULL ORDER BY id")]
    assert len(files) == 4
    with torch.no_grad():
        naive = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    naive = torch.nn.functional.normalize(naive, dim=1).numpy()
    np.testing.assert_allclose(stored(archive["index"])[str(archive["images"].resolve())], naive, atol=1e-5)


def test_a_query_finds_the_file_itself_and_a_slide_region_its_patch(archive, tmp_path, capsys):
    query = tmp_path / "queries" / "s1_copy.png"
    query.parent.mkdir()
    shutil.copyfile(archive["images"] / "s1" / "s1_0.png", query)
    assert run(*cpu("query", "--index", str(archive["index"]), str(query), "--out-dir", str(tmp_path / "out"))) == 0
    first = first_match(tmp_path / "out")
    assert first["file"] == str((archive["images"] / "s1" / "s1_0.png").resolve()) and float(first["similarity"]) > 0.9999

    with SlideIndex.open(archive["index"]) as index:
        source = index.source_by_path(archive["slide"])
        ids = index.patch_ids(source.id)
        assert len(ids) > 2
        patch = index.patches(ids[len(ids) // 2:][:1]).popitem()[1]
    region = f"{patch.x},{patch.y},{patch.width},{patch.height}"
    assert run(*cpu("query", "--index", str(archive["index"]), archive["slide"], "--region", region,
                    "--out-dir", str(tmp_path / "region"))) == 0
    first = first_match(tmp_path / "region")
    assert (first["source"], first["x"], first["y"]) == (archive["slide"], str(patch.x), str(patch.y))
    assert float(first["similarity"]) > 0.9999

    capsys.readouterr()
    assert run("list", "--index", str(archive["index"])) == 0
    listing = capsys.readouterr().out.splitlines()[0]
    assert SPEC in listing and "resize to 248 px (bicubic), centre crop 224 px" in listing
    assert str(archive["weights"].resolve()) in listing


def test_an_index_refuses_another_encoder_and_other_weights(archive, tmp_path, write_checkpoint):
    images, index = str(archive["images"]), str(archive["index"])
    with pytest.raises(UserError, match=r"refusing to mix: --encoder histogram \(histogram\) \(the index has "
                                        rf"{SPEC} \(timm\)\)"):
        run(*cpu("index", "--encoder", "histogram", images, "--index", index, "--mpp", MPP, "--patch-size", PATCH))
    other = save_weights(tmp_path / "other.pth", seed=2)
    with pytest.raises(UserError, match=r"refusing to mix: weights \(model hash\)"):
        run(*cpu("index", "--encoder", SPEC, "--encoder-weights", str(other), images, "--index", index, "--mpp", MPP,
                 "--patch-size", PATCH))
    checkpoint = tmp_path / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    with pytest.raises(UserError, match=r"refusing to mix: --encoder checkpoint \(the index has " + SPEC):
        run(*cpu("index", str(checkpoint), images, "--index", index, "--mpp", MPP, "--patch-size", PATCH))
    with pytest.raises(UserError, match=r"not the weights this index was built with \(their hash differs\); pass the "
                                        r"index's weights file with --encoder-weights"):
        run(*cpu("query", "--index", index, images, "--encoder-weights", str(other), "--out-dir", str(tmp_path / "q")))
    with pytest.raises(UserError, match="this index was built with --encoder timm:vit_tiny_patch16_224; pass its "
                                        "weights with --encoder-weights"):
        run(*cpu("query", "--index", index, images, "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "q")))
    with pytest.raises(UserError, match=r"--crop-size: timm:vit_tiny_patch16_224 has its own input size"):
        run(*cpu("index", "--encoder", SPEC, "--encoder-weights", str(archive["weights"]), images, "--index", index,
                 "--crop-size", "64"))
    with pytest.raises(UserError, match="a checkpoint given beside --encoder"):
        run(*cpu("index", "--encoder", SPEC, str(checkpoint), images, "--index", index))
    with pytest.raises(UserError, match="pass the checkpoint and at least one SOURCE"):
        run(*cpu("index", images, "--index", str(tmp_path / "new")))
    assert not (tmp_path / "new").exists() and not (tmp_path / "q").exists()


def test_weights_changed_or_moved_are_refused_in_one_line_then_found_with_encoder_weights(archive, tmp_path):
    weights = shutil.copyfile(archive["weights"], tmp_path / "weights.pth")
    index = tmp_path / "index"
    assert run(*cpu("index", "--encoder", SPEC, "--encoder-weights", str(weights), str(archive["images"] / "s0"),
                    "--index", str(index))) == 0
    query = ["query", "--index", str(index), str(archive["images"] / "s1"), "--out-dir", str(tmp_path / "out")]
    save_weights(weights, seed=2)  # the file changed in place
    with pytest.raises(UserError) as changed:
        run(*cpu(*query))
    assert str(changed.value) == (f"{weights}: not the weights this index was built with (their hash differs); pass "
                                  "the index's weights file with --encoder-weights")
    moved = shutil.copyfile(archive["weights"], tmp_path / "moved.pth")
    weights.unlink()
    with pytest.raises(UserError, match=f"{weights}: the weights of the index's encoder \\({SPEC}\\) are missing; "
                                        "pass their new place with --encoder-weights FILE"):
        run(*cpu(*query))
    assert run(*cpu(*query, "--encoder-weights", str(moved))) == 0


def test_an_upload_is_searched_as_the_same_file_queried_through_the_encoders_resize(archive, tmp_path):
    """The page cuts an upload through the index's input steps (resize, then crop) once, as
    `retrieve.py query` cuts the file: the same vectors, at the crop size, larger and smaller."""
    from histo_retrieval.search.service import SearchService

    service = SearchService.open(str(archive["index"]), "cpu", batch_size=8)
    try:
        summary = service.summary()
        assert (summary["encoder"], summary["encoder_kind"], summary["crop_size"]) == (SPEC, "timm", 224)
        rng = np.random.default_rng(7)
        for height, width in ((224, 224), (260, 300), (40, 56)):
            path = tmp_path / f"query_{height}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(path)
            upload = service.search_upload(path.read_bytes(), path.name)
            [queried], failed = run_queries(service.index, query_jobs([str(path)]), service.embedder, out_dir=None,
                                            progress=False)
            assert not failed and upload.result.pixels.shape == (224, 224, 3)
            assert np.array_equal(upload.result.vectors, queried.vectors)
    finally:
        service.close()


def test_a_preset_records_its_scale_says_when_the_run_is_at_another_and_queries(archive, tmp_path, capsys):
    options = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2})
    index = tmp_path / "index"
    assert run(*cpu("index", "--encoder", "uni", "--encoder-weights", "random", "--encoder-options", options,
                    str(archive["images"]), "--index", str(index), "--mpp", MPP)) == 0
    assert "note: uni expects patches at 0.5 um/px; they are cut at --mpp 1.0" in capsys.readouterr().out
    model = json.loads((index / "manifest.json").read_text())["model"]
    assert (model["spec"], model["kind"], model["weights"], model["mpp"], model["embedding_dim"]) == (
        "uni", "preset", "random", 0.5, 32)
    assert model["model_options"]["init_values"] == 1e-5 and model["model_options"]["embed_dim"] == 32
    query = archive["images"] / "s0" / "s0_1.png"
    assert run(*cpu("query", "--index", str(index), str(query), "--out-dir", str(tmp_path / "out"))) == 0


def test_the_histogram_indexes_and_queries(archive, tmp_path):
    index = tmp_path / "index"
    assert run(*cpu("index", "--encoder", "histogram", str(archive["images"]), "--index", str(index))) == 0
    model = json.loads((index / "manifest.json").read_text())["model"]
    assert (model["spec"], model["kind"], model["weights"], model["embedding_dim"]) == ("histogram", "histogram", "",
                                                                                      512)
    query = tmp_path / "s0_copy.png"
    shutil.copyfile(archive["images"] / "s0" / "s0_1.png", query)
    assert run(*cpu("query", "--index", str(index), str(query), "--out-dir", str(tmp_path / "out"))) == 0
    first = first_match(tmp_path / "out")
    assert first["file"] == str((archive["images"] / "s0" / "s0_1.png").resolve()) and float(first["similarity"]) > 0.9999
