"""multi_test.py: the folder sweep over every kind of file, its selection, result files, exit status and
embedding maps. The library it runs has its own tests: test_checkpoint.py, test_embedder.py,
test_selection.py, test_protocols.py."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
import multi_test
from histo_retrieval.evaluation import embedder as embedder_module
from histo_retrieval.evaluation import protocols as evaluation
from histo_retrieval.encoders.weights import CheckpointError, read_torch_file
from histo_retrieval.encoders.project import load_model
from histo_retrieval.data.datasets import KimiaDataset, eval_transform
from histo_retrieval.files import command_line

REPO = Path(__file__).resolve().parent.parent
CROP = 32


class Pickled:
    """A Python object that only an unsafe (weights_only=False) load rebuilds."""


def test_a_file_that_is_no_torch_checkpoint_is_named_in_one_line_without_pytorchs_advice(
        data_dir, tmp_path, capsys, write_checkpoint):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "x.pth").write_text("some notes, saved under the wrong name\n")
    torch.save({"model": Pickled()}, weights / "objects.pth")
    write_checkpoint(weights / "se_resnet50_MSLoss_0.5000.pth", "se_resnet50", crop_size=CROP)
    with pytest.raises(CheckpointError) as err:
        read_torch_file(weights / "objects.pth", label="objects.pth")
    assert str(err.value) == ("objects.pth: holds Python objects besides tensors and plain data, which are not loaded "
                              "(they could run code); save the model's state_dict or a train.py checkpoint")
    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data_dir), "--batch-size", "9", "--device", "cpu", "--workers", "0"])
    assert multi_test.main(args) == 1  # the sweep goes on past both, and says so in its exit status
    out, err = capsys.readouterr()
    not_torch = "x.pth: not a PyTorch checkpoint (neither the zip archive nor the pickle that torch.save writes)"
    assert f"FAILED {not_torch}\n" in out
    assert "se_resnet50_MSLoss_0.5000.pth [se_resnet50, protocol test, selected by validation]" in out
    assert err.splitlines()[-3:] == ["2 of 3 files failed:", "  objects.pth: holds Python objects besides tensors and "
                                     "plain data, which are not loaded (they could run code); save the model's "
                                     "state_dict or a train.py checkpoint", f"  {not_torch}"]
    assert "weights_only" not in out + err


def test_sweep_over_a_folder_of_every_kind_of_file(data_dir, tmp_path, capsys, make_images, write_checkpoint):
    weights = tmp_path / "model"
    weights.mkdir()
    write_checkpoint(weights / "ABE_M_ABELoss_0.4000.pth", "ABE_M", seed=1)
    write_checkpoint(weights / "resnet50_ContrastiveLoss_0.3000.pth", "resnet50", seed=2)
    write_checkpoint(weights / "se_resnet50_MSLoss_0.2000.pth", "se_resnet50", seed=3)
    torch.save(models.build_model("se_resnet50", attention=False).state_dict(), weights / "se_resnet_MsLoss_0.7590.pth")
    torch.save(models.build_model("ABE_M").state_dict(), weights / "resnet50_MsLoss_0.1000.pth")  # wrong prefix
    (weights / "corrupt.pth").write_bytes(b"truncated")
    (weights / "notes.txt").write_text("not a checkpoint, not a .pth: ignored")
    data = tmp_path / "data"
    make_images(data / "test", {"s0": 3, "s1": 3, "s2": 1}, seed=3)
    make_images(data / "train", {"s0": 2, "s1": 2, "s2": 2}, seed=4)
    (data / "test" / "s1" / "s1_broken.png").write_bytes(b"not a png")

    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data), "--protocol", "both", "--crop-size", str(CROP), "--batch-size", "4",
         "--device", "cpu", "--workers", "0"])
    status = multi_test.main(args)
    out, err = capsys.readouterr()

    assert status == 1
    assert "FAILED corrupt.pth: not a PyTorch checkpoint (neither the zip archive nor the pickle" in out
    assert re.search(r"FAILED resnet50_MsLoss_0\.1000\.pth: does not fit resnet50 .*missing keys", out)
    assert "2 of 6 files failed" in err
    assert re.search(r"1 unreadable image\(s\) were left out:\n  \S*s1_broken\.png \(", err)
    with open(weights / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["protocol"]) for r in rows] == [
        (name, protocol) for name in ("ABE_M_ABELoss_0.4000.pth", "resnet50_ContrastiveLoss_0.3000.pth",
                                      "se_resnet50_MSLoss_0.2000.pth", "se_resnet_MsLoss_0.7590.pth")
        for protocol in ("test", "train")]
    assert {r["model"] for r in rows} == {"ABE_M", "resnet50", "se_resnet50"}
    bare = [r for r in rows if r["checkpoint"] == "se_resnet_MsLoss_0.7590.pth"]
    assert all(r["source"] == "reference state_dict" and '"attention": false' in r["model_options"] for r in bare)
    # The validation loss from the name; the run from the name and the keys (no attention branch).
    assert all(float(r["val_loss"]) == 0.759 and r["run"] == "se_resnet-noattention_MsLoss" for r in bare)
    assert {r["selected_by"] for r in rows} == {"validation"}  # each file is the only one of its run
    # The bare ABE_M weights named resnet50_ are their run's selection, so that run has no result.
    assert "resnet50_MsLoss_0.1000.pth: selected by validation but could not be evaluated" in out
    for row in rows:
        # The command that started the process (here pytest's), as the reproducibility record.
        assert row["classes"] == "s0 s1 s2" and row["command"] == command_line() and row["crop_size"] == str(CROP)
        assert row["num_queries"] == "7"  # the broken image is skipped, not fatal
        assert row["num_gallery"] == ("7" if row["protocol"] == "test" else "6")
        confusion = np.loadtxt(weights / row["confusion_csv"], delimiter=",", skiprows=2, dtype=object)[:, 1:]
        confusion = confusion.astype(int)
        assert confusion.sum() == 7 and np.trace(confusion) == int(row["correct"])
        assert float(row["eta_p"]) == pytest.approx(int(row["correct"]) / 7)
        assert (weights / row["confusion_csv"]).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    se_lines = (weights / "se_resnet50_results.txt").read_text().splitlines()
    assert len(se_lines) == 4
    line = re.compile(r"^(\S+\.pth)\[\(([\d.]+), 'np'\), \(([\d.]+), 'nw'\), \(([\d.]+), 'n_total'\)\]  # protocol=(test|train)$")
    for text in se_lines:
        match = line.match(text)
        assert match, text
        row = next(r for r in rows if (r["checkpoint"], r["protocol"]) == (match[1], match[5]))
        assert float(match[4]) == pytest.approx(float(row["eta_total"]))
    assert (weights / "ABE_M_results.txt").exists() and (weights / "resnet50_results.txt").exists()
    ranking = out[out.index("| rank |"):].splitlines()[2:10]
    totals = [float(r.split("|")[8]) for r in ranking]
    assert len(totals) == 8 and totals == sorted(totals, reverse=True)


def test_sweep_reports_the_validation_selected_checkpoint(data_dir, tmp_path, capsys, write_checkpoint):
    weights = tmp_path / "model"
    weights.mkdir()
    write_checkpoint(weights / "se_resnet50_MSLoss_0.5000.pth", "se_resnet50", seed=1, val_loss=0.5, epoch=0)
    write_checkpoint(weights / "se_resnet50_MSLoss_0.3000.pth", "se_resnet50", seed=2, val_loss=0.3, epoch=2)
    write_checkpoint(weights / "checkpoint.pth", "se_resnet50", seed=3, val_loss=0.4, best_val_loss=0.3, epoch=4)
    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data_dir), "--batch-size", "9", "--device", "cpu", "--workers", "0"])
    assert multi_test.main(args) == 0
    out = capsys.readouterr().out

    with open(weights / "results.csv", newline="") as f:
        rows = {r["checkpoint"]: r for r in csv.DictReader(f)}
    assert {name: (r["selected_by"], r["val_loss"], r["run"]) for name, r in rows.items()} == {
        "checkpoint.pth": ("last_epoch", "0.4", "se_resnet50_MSLoss"),
        "se_resnet50_MSLoss_0.3000.pth": ("validation", "0.3", "se_resnet50_MSLoss"),
        "se_resnet50_MSLoss_0.5000.pth": ("", "0.5", "se_resnet50_MSLoss"),
    }
    selected_at = out.index("selected by validation (")
    ranking_at = out.index("all files, best on the test set first (selection on the test set: not a result to report)")
    assert selected_at < ranking_at
    table = [line.split("|") for line in out[selected_at:ranking_at].splitlines() if line.startswith("| se_resnet50")]
    assert len(table) == 1
    assert [cell.strip() for cell in table[0][1:5]] == ["se_resnet50_MSLoss", "se_resnet50_MSLoss_0.3000.pth",
                                                        "0.3000", "test"]
    chosen = rows["se_resnet50_MSLoss_0.3000.pth"]
    assert [float(c) for c in table[0][5:8]] == pytest.approx(
        [float(chosen[k]) for k in ("eta_p", "eta_w", "eta_total")], abs=5e-5)
    ranking = [line.split("|") for line in out[ranking_at:].splitlines()[3:6]]
    assert {(r[2].strip(), r[3].strip()) for r in ranking} == {(name, r["selected_by"]) for name, r in rows.items()}
    assert "se_resnet50_MSLoss_0.3000.pth [se_resnet50, protocol test, selected by validation]" in out
    assert "checkpoint.pth [se_resnet50, protocol test, last epoch]" in out


def test_results_mode_overwrite_replaces_and_append_keeps_earlier_rows(data_dir, tmp_path, capsys):
    weights = tmp_path / "model"
    weights.mkdir()
    torch.save(models.build_model("se_resnet50", attention=False).state_dict(), weights / "se_resnet_MsLoss_final.pth")
    old_line = "old.pth[(0.1, 'np'), (0.2, 'nw'), (0.02, 'n_total')]\n"
    (weights / "se_resnet50_results.txt").write_text(old_line)
    with open(weights / "results.csv", "w", newline="") as f:  # an earlier sweep's file, without selected_by
        f.write("protocol,checkpoint,eta_total\ntest,old.pth,0.02\n")
    argv = [str(weights), "--data-dir", str(data_dir), "--crop-size", str(CROP), "--device", "cpu", "--workers", "0"]
    assert multi_test.get_args_parser().parse_args(argv).results_mode == "overwrite"  # the reference's

    def sweep(*extra: str) -> tuple[list[dict], list[str]]:
        assert multi_test.main(multi_test.get_args_parser().parse_args(argv + list(extra))) == 0
        with open(weights / "results.csv", newline="") as f:
            return list(csv.DictReader(f)), (weights / "se_resnet50_results.txt").read_text().splitlines(keepends=True)

    rows, lines = sweep("--results-mode", "append")
    assert [r["checkpoint"] for r in rows] == ["old.pth", "se_resnet_MsLoss_final.pth"]
    assert rows[0]["selected_by"] == "" and rows[0]["eta_total"] == "0.02" and rows[1]["command"]
    assert len(lines) == 2 and lines[0] == old_line and lines[1].startswith("se_resnet_MsLoss_final.pth[(")
    # No loss in the name of a bare state_dict: no validation loss, no selection.
    assert (rows[1]["selected_by"], rows[1]["val_loss"]) == ("", "")
    assert "none: no best-validation file with a readable validation loss was evaluated" in capsys.readouterr().out

    rows, overwritten = sweep()
    assert [r["checkpoint"] for r in rows] == ["se_resnet_MsLoss_final.pth"]
    assert overwritten == lines[1:]
    assert not list(weights.glob(".*.tmp"))  # atomic writes leave no temp files behind


@pytest.mark.slow
def test_script_reports_a_missing_folder_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "multi_test.py", str(tmp_path / "nowhere")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder; pass the folder holding the .pth checkpoints"


def test_each_image_is_decoded_once_per_run_whatever_the_checkpoints(data_dir, tmp_path, monkeypatch, write_checkpoint):
    weights = tmp_path / "model"
    weights.mkdir()
    write_checkpoint(weights / "se_resnet50_MSLoss_0.5000.pth", "se_resnet50", seed=1, attention=False)
    write_checkpoint(weights / "ABE_M_ABELoss_0.4000.pth", "ABE_M", seed=2)
    decoded = []
    real_load_rgb = embedder_module.load_rgb
    monkeypatch.setattr(embedder_module, "load_rgb", lambda path: decoded.append(Path(path).name) or real_load_rgb(path))
    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data_dir), "--protocol", "both", "--device", "cpu", "--workers", "0"])
    assert multi_test.main(args) == 0
    images = sorted(p.name for p in data_dir.rglob("*.png"))
    assert sorted(decoded) == images  # test and train images, each once for the two checkpoints


def test_an_unreadable_image_makes_the_exit_status_1(tmp_path, capsys, make_images, write_checkpoint):
    data = tmp_path / "data"
    make_images(data / "test", {"s0": 3, "s1": 3}, seed=8)
    (data / "test" / "s0" / "s0_truncated.png").write_bytes(b"\x89PNG\r\n")
    weights = tmp_path / "model"
    weights.mkdir()
    write_checkpoint(weights / "se_resnet50_MSLoss_0.5000.pth", "se_resnet50", attention=False)
    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data), "--device", "cpu", "--workers", "0"])
    assert multi_test.main(args) == 1
    out, err = capsys.readouterr()
    assert "se_resnet50_MSLoss_0.5000.pth [se_resnet50, protocol test, selected by validation]" in out
    assert "files failed" not in err and "1 unreadable image(s) were left out:" in err and "s0_truncated.png" in err
    with open(weights / "results.csv", newline="") as f:
        assert [row["num_queries"] for row in csv.DictReader(f)] == ["6"]


def test_plot_embeddings_maps_each_checkpoints_test_embeddings(data_dir, tmp_path, monkeypatch, write_checkpoint):
    weights, output = tmp_path / "model", tmp_path / "results"
    weights.mkdir()
    write_checkpoint(weights / "resnet50_MSLoss_0.5000.pth", "resnet50", seed=4, embedding_dim=64)
    write_checkpoint(weights / "se_resnet50_MSLoss_0.3000.pth", "se_resnet50", seed=5, attention=False)
    received = []

    def recording_tsne(embeddings, seed=0):
        received.append(embeddings.clone())
        return evaluation.tsne_coordinates(embeddings, seed)

    monkeypatch.setattr(multi_test, "tsne_coordinates", recording_tsne)
    args = multi_test.get_args_parser().parse_args(
        [str(weights), "--data-dir", str(data_dir), "--protocol", "both", "--plot-embeddings", "--device", "cpu",
         "--workers", "0", "--batch-size", "4", "--output-dir", str(output)])
    assert multi_test.main(args) == 0

    width, height = (round(inches * evaluation.TSNE_DPI) for inches in evaluation.TSNE_FIGURE_INCHES)
    for number, name in enumerate(("resnet50_MSLoss_0.5000", "se_resnet50_MSLoss_0.3000")):
        with Image.open(output / "embeddings" / f"{name}_tsne.png") as image:
            assert image.format == "PNG" and image.size == (width, height)
        # One map per checkpoint, of the test images only (9 of them), as the retrieval ranks them.
        loaded = load_model(weights / f"{name}.pth")
        dataset = KimiaDataset(data_dir / "test", eval_transform(CROP))
        with torch.no_grad():
            learners = loaded.model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
        mean_cosine = sum(e @ e.T for e in learners) / len(learners)
        assert received[number].shape[0] == 9
        torch.testing.assert_close(received[number] @ received[number].T, mean_cosine, atol=1e-5, rtol=0)
    assert len(received) == 2


# ----------------------------------------------------------------------------- --encoder: any encoder, no training
def naive_colour_histogram(path: Path, crop: int, bins: int = 8) -> np.ndarray:
    """The joint RGB histogram (numpy) of the image's centre crop (torchvision's CenterCrop offsets), L1-normalised."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    top, left = int(round((pixels.shape[0] - crop) / 2.0)), int(round((pixels.shape[1] - crop) / 2.0))
    levels = pixels[top:top + crop, left:left + crop].reshape(-1, 3).astype(np.int64) * bins // 256
    counts, _ = np.histogramdd(levels, bins=(bins, bins, bins), range=[(0, bins)] * 3)
    return counts.reshape(-1) / counts.sum()  # cell (r, g, b) at (r * bins + g) * bins + b, as the encoder's


def naive_kimia_scores(queries: list[tuple[str, np.ndarray]], gallery: list[tuple[str, np.ndarray]],
                       leave_one_out: bool) -> dict[str, float]:
    """eta_p, eta_W and eta_total of nearest-neighbour search by cosine, by plain loops."""
    hits: dict[str, list[bool]] = {}
    for i, (label, vector) in enumerate(queries):
        best, predicted = -2.0, None
        for j, (other_label, other) in enumerate(gallery):
            if leave_one_out and i == j:
                continue
            cosine = float(vector @ other / np.sqrt((vector @ vector) * (other @ other)))
            if cosine > best:
                best, predicted = cosine, other_label
        hits.setdefault(label, []).append(predicted == label)
    eta_p = sum(sum(h) for h in hits.values()) / len(queries)
    eta_w = sum(sum(h) / len(h) for h in hits.values()) / len(hits)  # the mean per-class recall
    return {"eta_p": eta_p, "eta_w": eta_w, "eta_total": eta_p * eta_w}


def images_of(split: Path) -> list[Path]:
    """A split's images in the order of its class folders and their files."""
    return [p for c in sorted(split.iterdir()) if c.is_dir() for p in sorted(c.glob("*.png"))]


def test_encoder_histogram_is_the_benchs_row_and_a_naive_histogram_search(data_dir, tmp_path, capsys):
    from bench import real_data

    output = tmp_path / "results"
    argv = ["--encoder", "histogram", "--encoder-options", f'{{"crop_size": {CROP}}}', "--data-dir", str(data_dir),
            "--protocol", "both", "--output-dir", str(output), "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    assert multi_test.main(multi_test.get_args_parser().parse_args(argv)) == 0  # no weight folder needed
    with open(output / "results.csv", newline="") as f:
        rows = {row["protocol"]: row for row in csv.DictReader(f)}
    out = capsys.readouterr().out

    # bench/real_data.py's colour-histogram row (8 bins, the checkpoint's crop, no stain step) on the same images.
    with evaluation.Evaluator(data_dir, batch_size=4, device="cpu") as evaluator:
        results = evaluator.evaluate(real_data.histogram_encoder(8, CROP, None, "cpu"), real_data.PROTOCOLS)
    bench_row = real_data.table_rows({"colour histogram": {r["protocol"]: r for r in results}}, {})[0]
    histograms = {split: [(p.parent.name, naive_colour_histogram(p, CROP)) for p in images_of(data_dir / split)]
                  for split in ("test", "train")}
    naive = {"test": naive_kimia_scores(histograms["test"], histograms["test"], leave_one_out=True),
             "train": naive_kimia_scores(histograms["test"], histograms["train"], leave_one_out=False)}
    assert naive["test"]["eta_p"] < 1  # s2's single test image finds no image of its class
    vectors = np.stack([vector for _, vector in histograms["test"]])
    np.testing.assert_allclose(results[0]["query_embeddings"].numpy(),
                               vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-6, rtol=0)
    for protocol in ("test", "train"):
        for ours, bench in (("eta_p", "eta_p"), ("eta_w", "eta_W"), ("eta_total", "eta_total"),
                            ("recall@1", "recall@1"), ("map@r", "map@r")):
            assert float(rows[protocol][ours]) == bench_row[f"{protocol}_{bench}"], (protocol, ours)
        for metric, value in naive[protocol].items():
            assert float(rows[protocol][metric]) == pytest.approx(value, abs=1e-12), (protocol, metric)
        row = rows[protocol]
        assert (row["checkpoint"], row["encoder"], row["encoder_kind"], row["selected_by"], row["model"]) == (
            "histogram", "histogram", "histogram", "encoder", "histogram")
        assert row["weights_sha256"] == results[0]["weights_sha256"] and len(row["weights_sha256"]) == 64
        assert json.loads(row["input_steps"]) == {"crop_size": CROP, "resize": None, "interpolation": "bilinear"}
        assert json.loads(row["model_options"]) == {"bins": 8, "crop_size": CROP} and row["val_loss"] == ""
    lines = (output / "histogram_results.txt").read_text().splitlines()
    assert [line.split("[")[0] for line in lines] == ["histogram", "histogram"]
    assert (output / "confusion" / "histogram_test.csv").exists() and (output / "confusion" / "histogram_train.csv").exists()
    # No training run: no selection applies; the encoders have a table of their own.
    assert "selected by validation (" not in out
    encoders_at = out.index("encoders named by --encoder (no training run: no selection applies")
    assert out.index("all encoders, best on the test set first") > encoders_at
    assert "| histogram | histogram | histogram |" in out[encoders_at:]


def test_a_timm_encoder_beside_the_folders_checkpoint(data_dir, tmp_path, capsys, write_checkpoint):
    import timm
    from safetensors.torch import save_file

    from histo_retrieval.encoders.weights import read_weights, tensors_sha256

    weights = tmp_path / "model"
    weights.mkdir()
    checkpoint = weights / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=CROP, attention=False)
    torch.manual_seed(7)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.safetensors")
    base = [str(weights), "--data-dir", str(data_dir), "--batch-size", "9", "--device", "cpu", "--workers", "0"]

    def sweep(*extra: str) -> dict[str, dict]:
        assert multi_test.main(multi_test.get_args_parser().parse_args(base + list(extra))) == 0
        with open(weights / "results.csv", newline="") as f:
            return {row["checkpoint"]: row for row in csv.DictReader(f)}

    alone = sweep()
    rows = sweep("--encoder", "timm:resnet18", "--encoder-weights", str(tmp_path / "r18.safetensors"))
    out = capsys.readouterr().out
    assert list(rows) == [checkpoint.name, "timm-resnet18_r18"]
    ours, timm_row = rows[checkpoint.name], rows["timm-resnet18_r18"]
    # The checkpoint's row: its own identity, its validation selection and scores as in a sweep without --encoder.
    assert (ours["encoder"], ours["encoder_kind"], ours["selected_by"]) == (str(checkpoint), "checkpoint", "validation")
    assert ours["weights_sha256"] == load_model(checkpoint).weights_sha256() == alone[checkpoint.name]["weights_sha256"]
    assert {k: ours[k] for k in ("eta_p", "eta_w", "eta_total", "map@r")} == {
        k: alone[checkpoint.name][k] for k in ("eta_p", "eta_w", "eta_total", "map@r")}
    # The encoder's row: its spec, kind, the hash of the file's tensors, timm's own input steps and normalisation.
    assert (timm_row["encoder"], timm_row["encoder_kind"], timm_row["model"], timm_row["selected_by"]) == (
        "timm:resnet18", "timm", "resnet18", "encoder")
    assert timm_row["weights_sha256"] == tensors_sha256(read_weights(tmp_path / "r18.safetensors"))
    config = timm.data.resolve_data_config({}, model=timm.create_model("resnet18", num_classes=0))
    assert json.loads(timm_row["input_steps"]) == {"crop_size": config["input_size"][2], "interpolation": "bicubic",
                                                   "resize": int(config["input_size"][2] / config["crop_pct"])}
    assert timm_row["crop_size"] == "224" and str(list(config["mean"])) in timm_row["normalisation"]
    assert timm_row["num_queries"] == "9" and timm_row["classes"] == "s0 s1 s2"
    # Each in its own results file; the encoder's file never mixes with a checkpoint model's.
    assert (weights / "se_resnet50_results.txt").read_text().startswith(checkpoint.name + "[(")
    assert (weights / "timm-resnet18_results.txt").read_text().startswith("timm-resnet18_r18[(")
    assert (weights / "confusion" / "timm-resnet18_r18_test.csv").exists()
    assert f"timm-resnet18_r18 [timm:resnet18: resnet18, protocol test, encoder, weights {timm_row['weights_sha256'][:12]}]" in out
    assert "all files and encoders, best on the test set first" in out


def test_an_unknown_encoder_is_refused_in_one_line_before_any_work(data_dir, tmp_path, capsys, write_checkpoint):
    weights = tmp_path / "model"
    weights.mkdir()
    write_checkpoint(weights / "se_resnet50_MSLoss_0.5000.pth", "se_resnet50", crop_size=CROP, attention=False)
    for argv, message in (
            (["--encoder", "histgram", "--output-dir", str(tmp_path / "out")],
             "error: --encoder histgram: neither a checkpoint file nor a known encoder (did you mean histogram? known: "
             "histogram, uni, "),
            ([str(weights), "--encoder", "timm:resnet19", "--encoder-weights", "random"],
             "error: timm:resnet19: timm has no such architecture; did you mean resnet18"),
            ([str(weights), "--encoder", "timm:resnet18"], "error: timm:resnet18: pass its weights with --encoder-weights"),
            (["--encoder", "histogram"], "error: --output-dir: pass the folder the results go to"),
            ([], "error: pass the folder holding the .pth checkpoints, or --encoder SPEC (or both)")):
        args = multi_test.get_args_parser().parse_args(argv + ["--data-dir", str(data_dir), "--device", "cpu"])
        assert multi_test.run_script(multi_test.main, args) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
        assert "decoded" not in out
    assert not (weights / "results.csv").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_status:  # a weights file that belongs to no --encoder
        multi_test.get_args_parser().parse_args(["--encoder-weights", "r18.pth", "--encoder", "timm:resnet18"])
    assert exit_status.value.code == 2
    assert "--encoder-weights belongs to an --encoder: put it after the --encoder SPEC it is for" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --groups: slides or patients
def naive_grouped_kimia_eta_p(queries: list[tuple[str, str, np.ndarray]], gallery: list[tuple[str, str, np.ndarray]]) -> float:
    """eta_p of nearest-neighbour search by cosine over (label, group, vector), never within the query's group."""
    correct = 0
    for label, group, vector in queries:
        best, predicted = -2.0, None
        for other_label, other_group, other in gallery:
            cosine = float(vector @ other / np.sqrt((vector @ vector) * (other @ other)))
            if other_group != group and cosine > best:
                best, predicted = cosine, other_label
        correct += predicted == label
    return correct / len(queries)


def test_groups_name_the_protocol_record_the_file_and_leave_the_querys_slide_out(data_dir, tmp_path, capsys):
    import hashlib

    slides = {}
    for split in ("test", "train"):
        for number, path in enumerate(images_of(data_dir / split)):
            slides[f"{split}/{path.parent.name}/{path.name}"] = f"slide{number % 3}"  # slides across classes
    groups = tmp_path / "slides.csv"
    groups.write_text("image,group\n" + "".join(f"{image},{slide}\n" for image, slide in slides.items()))
    base = ["--encoder", "histogram", "--encoder-options", f'{{"crop_size": {CROP}}}', "--data-dir", str(data_dir),
            "--protocol", "both", "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    output = tmp_path / "grouped"
    args = multi_test.get_args_parser().parse_args(base + ["--output-dir", str(output), "--groups", str(groups)])
    assert multi_test.main(args) == 0
    with open(output / "results.csv", newline="") as f:
        rows = {row["protocol"]: row for row in csv.DictReader(f)}
    out = capsys.readouterr().out
    histograms = {split: [(p.parent.name, slides[f"{split}/{p.parent.name}/{p.name}"], naive_colour_histogram(p, CROP))
                          for p in images_of(data_dir / split)] for split in ("test", "train")}
    for protocol, gallery in (("test", "test"), ("train", "train")):
        row = rows[protocol]
        assert float(row["eta_p"]) == pytest.approx(naive_grouped_kimia_eta_p(histograms["test"], histograms[gallery]),
                                                    abs=1e-12), protocol
        assert (row["exclusion"], row["groups"], row["num_groups"]) == ("group", str(groups), "3")
        assert row["groups_sha256"] == hashlib.sha256(groups.read_bytes()).hexdigest()
        assert (output / "confusion" / f"histogram_{protocol}-groups.csv").exists()
    lines = (output / "histogram_results.txt").read_text().splitlines()
    assert [line.rsplit("# ", 1)[1] for line in lines] == ["protocol=test-groups", "protocol=train-groups"]
    assert "protocols test-groups, train-groups" in out and "| test-groups |" in out

    # Without --groups: the paper's protocols, and results.csv has the columns it always had.
    plain = tmp_path / "plain"
    assert multi_test.main(multi_test.get_args_parser().parse_args(base + ["--output-dir", str(plain)])) == 0
    with open(plain / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        plain_rows = list(reader)
    assert not {"exclusion", "groups", "groups_sha256", "num_groups"} & set(reader.fieldnames)
    assert [row["protocol"] for row in plain_rows] == ["test", "train"]
    assert (plain / "histogram_results.txt").read_text().splitlines()[0].endswith("# protocol=test")


def test_a_groups_file_missing_an_image_is_refused_before_any_work(data_dir, tmp_path):
    from histo_retrieval.errors import UserError

    images = [f"test/{p.parent.name}/{p.name}" for p in images_of(data_dir / "test")]
    groups = tmp_path / "slides.csv"
    groups.write_text("image,group\n" + "".join(f"{image},slide\n" for image in images if "/s1/" not in image))
    output = tmp_path / "results"
    args = multi_test.get_args_parser().parse_args(["--encoder", "histogram", "--data-dir", str(data_dir), "--output-dir",
                                                    str(output), "--groups", str(groups), "--device", "cpu"])
    with pytest.raises(UserError) as refused:
        multi_test.main(args)
    assert str(refused.value) == (f"--groups {groups}: no group for 4 of the 9 images of {data_dir / 'test'}, the "
                                  "first test/s1/s1_0.png; add a row image,group for each (groups are never guessed)")
    assert not output.exists()
