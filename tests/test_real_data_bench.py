"""bench/real_data.py (python3 -m bench.real_data): the three rows end to end on tiny synthetic data, the colour histogram recomputed
by hand, the options that reach train.py, and the one-line errors for a bad ROOT."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
METHODS = ["colour histogram", "untrained network", "trained"]
METRICS = ["eta_p", "eta_W", "eta_total", "recall@1", "map@r"]
BINS = 8


def run_bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "bench.real_data", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_root(tmp_path: Path, classes: int = 8, train: int = 5, test: int = 3) -> Path:
    """Synthetic tissue as ROOT/train/<class>/ and ROOT/test/<class>/ (8 classes on 4 stain palettes, so
    that colour alone does not separate every class)."""
    from KIMIA_data import synthetic

    source = tmp_path / "source"
    synthetic.main(synthetic.get_args_parser().parse_args(
        ["--out", str(source), "--classes", str(classes), "--train-per-class", str(train), "--test-per-class", str(test),
         "--patch-size", "64", "--workers", "1"]))
    root = tmp_path / "root"
    root.mkdir()
    (source / "Training").rename(root / "train")
    (source / "RGBPatches-test").rename(root / "test")
    return root


# ----------------------------------------------------------------------------- the naive colour histogram
def naive_histogram(path: Path, crop: int) -> list[float]:
    """The joint RGB histogram of the image's centre crop (torchvision's CenterCrop offsets), L1-normalised,
    counted pixel by pixel."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        left, top = int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + crop, top + crop))).reshape(-1, 3).tolist()
    counts = [0] * BINS ** 3  # a plain loop over the pixels
    for r, g, b in pixels:
        counts[(r * BINS // 256 * BINS + g * BINS // 256) * BINS + b * BINS // 256] += 1
    return [c / len(pixels) for c in counts]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def naive_scores(queries: list[tuple[str, list[float]]], gallery: list[tuple[str, list[float]]],
                 leave_one_out: bool) -> dict[str, float]:
    """eta_p, eta_W, eta_total, Recall@1 and mAP@R of nearest-neighbour search, by plain loops."""
    hits: dict[str, list[bool]] = {}
    average_precisions = []
    for i, (label, histogram) in enumerate(queries):
        ranked = sorted(((cosine(histogram, other), other_label) for j, (other_label, other) in enumerate(gallery)
                         if not (leave_one_out and i == j)), key=lambda pair: -pair[0])
        hits.setdefault(label, []).append(ranked[0][1] == label)
        relevant = sum(other_label == label for _, other_label in ranked)
        found, precision_sum = 0, 0.0
        for rank, (_, other_label) in enumerate(ranked[:relevant], 1):
            if other_label == label:
                found += 1
                precision_sum += found / rank
        average_precisions.append(precision_sum / relevant)
    eta_p = sum(sum(h) for h in hits.values()) / len(queries)
    eta_w = sum(sum(h) / len(h) for h in hits.values()) / len(hits)
    return {"eta_p": eta_p, "eta_W": eta_w, "eta_total": eta_p * eta_w, "recall@1": eta_p,  # no lone query here
            "map@r": sum(average_precisions) / len(average_precisions)}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bench_writes_three_rows_and_its_colour_histogram_is_the_naive_one(tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    import models
    from histo_retrieval.encoders.weights import read_weights, tensors_sha256

    root = make_root(tmp_path)
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    out = tmp_path / "check"
    torch.manual_seed(5)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.safetensors")
    encoders = ["--encoder", "timm:resnet18", "--encoder-weights", str(tmp_path / "r18.safetensors"),
                "--encoder", "histogram", "--encoder-options", '{"crop_size": 32}']
    # --lr 0: the parameters stay at their initialisation, so the untrained network's must equal them.
    result = run_bench(str(root), "--out", str(out), "--image-size", "40", *encoders, "--",
                       "--epochs", "1", "--crop-size", "32", "--batch-size", "8", "--device", "cpu", "--workers", "0",
                       "--val-batches", "fixed", "--lr", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("[1/4] preprocessing", "[2/4] training", "[3/4] untrained network", "[4/4] evaluating"):
        assert step in result.stdout
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # ROOT untouched

    with open(out / "real_data_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == METHODS + ["timm:resnet18 (r18.safetensors)", 'histogram {"crop_size": 32}']
    assert [(row["encoder"], row["encoder_kind"], row["crop_size"]) for row in rows] == [
        ("histogram", "histogram", "32"), (str(out / "untrained" / "se_resnet50_MSLoss_untrained.pth"), "checkpoint", "32"),
        (json.loads((out / "real_data_settings.json").read_text())["trained_checkpoint"], "checkpoint", "32"),
        ("timm:resnet18", "timm", "224"), ("histogram", "histogram", "32")]
    assert rows[3]["weights_sha256"] == tensors_sha256(read_weights(tmp_path / "r18.safetensors"))
    for row in rows:
        for protocol in ("test", "train"):
            for metric in METRICS:
                value = float(row[f"{protocol}_{metric}"])
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (row["method"], protocol, metric, value)
            assert float(row[f"{protocol}_eta_total"]) == pytest.approx(
                float(row[f"{protocol}_eta_p"]) * float(row[f"{protocol}_eta_W"]))
        assert row["test_queries"] == "24" and row["test_gallery"] == "24" and row["train_gallery"] == "40"
        assert row["seed"] == "1" and "-m bench.real_data" in row["command"]
    markdown = (out / "real_data_results.md").read_text()
    assert all(f"| {row['method']} |" in markdown for row in rows) and "Command: `" in markdown

    # The colour-histogram row equals a recomputation by hand on the preprocessed images.
    data = out / "data"
    histograms = {split: [(c.name, naive_histogram(p, 32)) for c in sorted((data / split).iterdir()) if c.is_dir()
                          for p in sorted(c.glob("*.png"))] for split in ("test", "train")}
    expected = {"test": naive_scores(histograms["test"], histograms["test"], leave_one_out=True),
                "train": naive_scores(histograms["test"], histograms["train"], leave_one_out=False)}
    for protocol, scores in expected.items():  # to float32 rounding: mAP@R is summed in float32
        for metric, value in scores.items():
            assert float(rows[0][f"{protocol}_{metric}"]) == pytest.approx(value, abs=1e-6), (protocol, metric)
    # The registry's histogram named by --encoder is the same row; so is multi_test.py --encoder histogram's.
    columns = [f"{protocol}_{metric}" for protocol in ("test", "train") for metric in METRICS]
    assert [rows[4][c] for c in columns] == [rows[0][c] for c in columns]
    run = subprocess.run([sys.executable, "multi_test.py", "--encoder", "histogram", "--encoder-options",
                          '{"crop_size": 32}', "--data-dir", str(data), "--protocol", "both", "--output-dir",
                          str(tmp_path / "multi_test"), "--device", "cpu", "--workers", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "multi_test" / "results.csv", newline="") as f:
        evaluated = {row["protocol"]: row for row in csv.DictReader(f)}
    for protocol in ("test", "train"):
        for metric, key in zip(METRICS, ("eta_p", "eta_w", "eta_total", "recall@1", "map@r")):
            assert float(evaluated[protocol][key]) == float(rows[0][f"{protocol}_{metric}"]), (protocol, metric)
        assert evaluated[protocol]["weights_sha256"] == rows[0]["weights_sha256"]

    # The options after -- reached train.py; the untrained network is train.py's own initialisation.
    settings = json.loads((out / "real_data_settings.json").read_text())
    assert settings["seed"] == 1 and settings["train_options"][:2] == ["--epochs", "1"]
    assert "train.py se_resnet50 MSLoss" in settings["train_command"]
    trained = torch.load(settings["trained_checkpoint"], map_location="cpu", weights_only=True)
    assert trained["args"]["epochs"] == 1 and trained["args"]["crop_size"] == 32 and trained["args"]["device"] == "cpu"
    untrained = torch.load(settings["untrained_checkpoint"], map_location="cpu", weights_only=True)
    assert untrained["model_options"] == trained["model_options"] and untrained["crop_size"] == 32
    parameters = [name for name, _ in models.build_model("se_resnet50", **trained["model_options"]).named_parameters()]
    assert all(torch.equal(untrained["model"][name], trained["model"][name]) for name in parameters)


# ----------------------------------------------------------------------------- options and errors
def test_options_after_the_separator_reach_train_py_untouched(tmp_path: Path) -> None:
    from bench import real_data
    options = ["--epochs", "3", "--crop-size", "48", "--device", "cpu", "--pretrained", "imagenet", "--keep-best", "2"]
    args = real_data.parse_args(["ROOT", "--out", str(tmp_path), "--model", "resnet50", "--", *options])
    assert args.train_options == options and args.model == "resnet50"
    targs = real_data.parse_train_options(real_data.train_argv(args, tmp_path), tmp_path)
    assert (targs.epochs, targs.crop_size, targs.device, targs.pretrained, targs.keep_best) == (3, 48, "cpu", "imagenet", 2)
    assert targs.data_dir == str(tmp_path / "data" / "train") and targs.output_dir == str(tmp_path / "model")
    with pytest.raises(real_data.UserError, match="--output-dir is set by the bench"):
        real_data.parse_train_options(real_data.train_argv(real_data.parse_args(
            ["ROOT", "--out", str(tmp_path), "--", "--output-dir", "elsewhere"]), tmp_path), tmp_path)
    with pytest.raises(real_data.UserError, match="train.py options after `--`: unrecognized arguments: --bogus"):
        real_data.parse_train_options(real_data.train_argv(real_data.parse_args(
            ["ROOT", "--out", str(tmp_path), "--", "--bogus"]), tmp_path), tmp_path)


@pytest.mark.parametrize("layout, message", [
    (None, "no such folder"),
    ({"train": ["s0", "s1"]}, "no test/ folder"),
    ({"train": ["s0", "s1", "s2"], "test": ["s0", "s1", "s3"]},
     "train/ and test/ have different classes (only in train/: s2; only in test/: s3)"),
    ({"train": ["s0", "s1"], "test": []}, "no class folders"),
])
def test_a_bad_root_is_refused_in_one_line(tmp_path: Path, make_images, layout, message: str) -> None:
    root = tmp_path / "root"
    for split, classes in (layout or {}).items():
        (root / split).mkdir(parents=True)
        if classes:
            make_images(root / split, {name: 1 for name in classes}, size=8)
    result = run_bench(str(root), "--out", str(tmp_path / "out"), "--", "--epochs", "1", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_train_options_before_the_separator_are_refused() -> None:
    result = run_bench("ROOT", "--epochs", "1", timeout=60)
    assert result.returncode == 2 and "train.py's options go after `--`" in result.stderr


# ----------------------------------------------------------------------------- the colour histogram: the registry's
def test_the_histogram_row_sees_the_checkpoints_stain_normalised_crop(tmp_path: Path) -> None:
    """bench.real_data's histogram is the registry's encoder with the trained checkpoint's stain step (and no
    mean and std): its vectors are the naive histograms of the stain-normalised centre crops."""
    import torch

    from bench import real_data
    from histo_retrieval.data.preprocessing import Preprocessing
    from histo_retrieval.data.stain import MacenkoNormalizer
    from histo_retrieval.evaluation.protocols import Evaluator

    root = make_root(tmp_path, classes=2, train=1, test=2)
    paths = sorted((root / "test").rglob("*.jpg"))
    normalizer = MacenkoNormalizer.fit(np.asarray(Image.open(sorted((root / "train").rglob("*.jpg"))[0]).convert("RGB")))
    checkpoint_steps = Preprocessing((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), normalizer.state())  # a pretrained, stained run
    encoder = real_data.histogram_encoder(BINS, 48, checkpoint_steps, "cpu")
    assert (encoder.spec, encoder.kind, encoder.crop_size) == ("histogram", "histogram", 48)
    assert encoder.preprocessing == Preprocessing(stain=normalizer.state())
    assert real_data.histogram_encoder(BINS, 48, None, "cpu").preprocessing == Preprocessing()
    with Evaluator(root, batch_size=3, device="cpu") as evaluator:
        embeddings = evaluator.evaluate(encoder, ("test",))[0]["query_embeddings"]
        plain = evaluator.evaluate(real_data.histogram_encoder(BINS, 48, None, "cpu"), ("test",))[0]["query_embeddings"]
    assert encoder.preprocessing.stain_normalizer.passed_through == 0  # every crop was normalised

    def naive(pixels: np.ndarray) -> np.ndarray:
        counts = np.zeros(BINS ** 3)
        for r, g, b in pixels.reshape(-1, 3).astype(int):
            counts[(r * BINS // 256 * BINS + g * BINS // 256) * BINS + b * BINS // 256] += 1
        return counts / np.linalg.norm(counts)

    crops = [np.asarray(Image.open(p).convert("RGB"))[8:56, 8:56] for p in paths]  # the 48 px centre of 64 px
    np.testing.assert_allclose(embeddings.numpy(), np.stack([naive(normalizer(c)) for c in crops]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(plain.numpy(), np.stack([naive(c) for c in crops]), atol=1e-6, rtol=0)
    assert not torch.allclose(embeddings, plain, atol=1e-3)


def test_an_unknown_encoder_is_refused_in_one_line_before_any_work(tmp_path: Path, make_images) -> None:
    root = tmp_path / "root"
    for split in ("train", "test"):
        make_images(root / split, {"s0": 1, "s1": 1}, size=8)
    result = run_bench(str(root), "--out", str(tmp_path / "out"), "--encoder", "histogram", "--encoder", "unii",
                       "--", "--epochs", "1", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --encoder unii: neither a checkpoint file nor a known "
                                                   "encoder (did you mean uni"), result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --groups
def test_groups_name_root_images_and_follow_them_to_the_preprocessed_names(tmp_path: Path, make_images) -> None:
    from bench import real_data

    root = tmp_path / "root"
    for split in ("train", "test"):
        make_images(root / split, {"s0": 2, "s1": 2}, size=8)
    groups_file = tmp_path / "slides.csv"
    groups_file.write_text("image,group\ntest/s0/s0_0.png,A\ntest/s0/s0_1.png,B\ntest/s1/s1_0.png,A\n"
                           "test/s1/s1_1.png,B\ntrain/s0/s0_0.png,A\ntrain/s0/s0_1.png,C\ntrain/s1/s1_0.png,C\n"
                           "train/s1/s1_1.png,D\n")
    groups = real_data.read_root_groups(str(groups_file), root, tmp_path / "out" / "data")
    # data_process.py writes <class>_<stem>.png: the groups follow the images there.
    assert groups.by_image == {"test/s0/s0_s0_0.png": "A", "test/s0/s0_s0_1.png": "B", "test/s1/s1_s1_0.png": "A",
                               "test/s1/s1_s1_1.png": "B", "train/s0/s0_s0_0.png": "A", "train/s0/s0_s0_1.png": "C",
                               "train/s1/s1_s1_0.png": "C", "train/s1/s1_s1_1.png": "D"}
    assert groups.path == str(groups_file) and groups.covers("train")

    # The table names the protocols and records the file; without groups its columns stay as they were.
    def result(protocol: str, grouped: bool) -> dict:
        record = groups.record() if grouped else {"groups": "", "groups_sha256": "", "num_groups": ""}
        return {"eta_p": 0.5, "eta_w": 0.5, "eta_total": 0.25, "recall@1": 0.5, "map@r": 0.5, "num_queries": 4,
                "num_gallery": 4, "crop_size": 8, "encoder": "histogram", "encoder_kind": "histogram",
                "weights_sha256": "0" * 64, "input_steps": {}, "protocol": protocol,
                "exclusion": "group" if grouped else "query" if protocol == "test" else "none", **record}

    grouped = real_data.table_rows({"colour histogram": {p: result(p, True) for p in ("test", "train")}}, {})
    assert (grouped[0]["test_protocol"], grouped[0]["train_protocol"]) == ("test-groups", "train-groups")
    assert (grouped[0]["groups"], grouped[0]["num_groups"]) == (str(groups_file), 4)
    assert "| method | test-groups: eta_p |" in real_data.markdown_table(grouped)
    plain = real_data.table_rows({"colour histogram": {p: result(p, False) for p in ("test", "train")}}, {})
    assert not {"test_protocol", "groups"} & set(plain[0])
    assert "| method | test: eta_p |" in real_data.markdown_table(plain)


def test_a_groups_file_missing_an_image_is_refused_in_one_line_before_any_work(tmp_path: Path, make_images) -> None:
    root = tmp_path / "root"
    for split in ("train", "test"):
        make_images(root / split, {"s0": 2, "s1": 2}, size=8)
    groups_file = tmp_path / "slides.csv"
    groups_file.write_text("image,group\ntest/s0/s0_0.png,A\ntest/s0/s0_1.png,B\n")
    result = run_bench(str(root), "--out", str(tmp_path / "out"), "--groups", str(groups_file), "--",
                       "--epochs", "1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --groups {groups_file}: no group for 2 of the 4 images of "
                                     f"{root / 'test'}, the first test/s1/s1_0.png; add a row image,group for each "
                                     "(groups are never guessed)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_with_groups_names_the_protocols_and_records_the_file(tmp_path: Path, make_images) -> None:
    import hashlib

    root = tmp_path / "root"
    make_images(root / "train", {"s0": 4, "s1": 4}, size=40, seed=1)
    make_images(root / "test", {"s0": 3, "s1": 3}, size=40, seed=2)
    groups_file = tmp_path / "slides.csv"
    groups_file.write_text("image,group\n" + "".join(f"{split}/{c}/{c}_{i}.png,{split}{i % 2}\n"
                                                     for split, n in (("train", 4), ("test", 3))
                                                     for c in ("s0", "s1") for i in range(n)))
    out = tmp_path / "check"
    result = run_bench(str(root), "--out", str(out), "--image-size", "40", "--groups", str(groups_file), "--",
                       "--epochs", "1", "--crop-size", "32", "--batch-size", "4", "--device", "cpu", "--workers", "0",
                       "--val-batches", "fixed")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "real_data_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    digest = hashlib.sha256(groups_file.read_bytes()).hexdigest()
    for row in rows:
        assert (row["test_protocol"], row["train_protocol"]) == ("test-groups", "train-groups")
        assert (row["groups"], row["groups_sha256"], row["num_groups"]) == (str(groups_file), digest, "4")
    assert "| method | test-groups: eta_p |" in (out / "real_data_results.md").read_text()
    settings = json.loads((out / "real_data_settings.json").read_text())
    assert settings["groups"]["groups_sha256"] == digest and settings["bench_options"]["groups"] == str(groups_file)
