"""multi_test.py and its library (histo_retrieval.evaluation.embedder, histo_retrieval.evaluation.protocols): checkpoint loading, the one eval
transform, the crop cache, both protocols, the folder sweep, its result files and embedding maps."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import models
import multi_test
from histo_retrieval.evaluation import embedder as embedder_module
from histo_retrieval.evaluation import protocols as evaluation
from histo_retrieval.evaluation import selection
from histo_retrieval.evaluation.checkpoint import CheckpointError, load_model, read_torch_file
from histo_retrieval.data.datasets import KimiaDataset, eval_crop, eval_transform
from histo_retrieval.evaluation.embedder import CropCache, Embedder
from histo_retrieval.evaluation.protocols import Evaluator, evaluate_checkpoint
from histo_retrieval.files import command_line
from histo_retrieval.evaluation.metrics import kimia_accuracy

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("s0", "s1", "s2")
CROP = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_images) -> Path:
    root = tmp_path_factory.mktemp("kimia")
    make_images(root / "test", {"s0": 4, "s1": 4, "s2": 1}, seed=1)  # s2: a class with one test image
    make_images(root / "train", {"s0": 2, "s1": 2, "s2": 2}, seed=2)
    return root


def test_the_one_eval_transform_is_the_references_bit_for_bit(data_dir):
    """eval_crop (uint8, what the crop cache keeps) then the division by 255 gives exactly the
    reference's CenterCrop + ToTensor, for images larger and smaller than the crop."""
    reference = transforms.Compose([transforms.CenterCrop(CROP), transforms.ToTensor()])
    rng = np.random.default_rng(0)
    for height, width in ((40, 40), (57, 41), (20, 26)):  # the last one padded by CenterCrop
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        crop = eval_crop(CROP)(image)
        assert crop.dtype == torch.uint8 and crop.is_contiguous()
        assert torch.equal(eval_transform(CROP)(image), reference(image))
        assert torch.equal(crop.float().div(255), reference(image))
    dataset = KimiaDataset(data_dir / "test", reference)
    with CropCache([path for path, _ in dataset.samples], CROP) as cache:
        cached = torch.cat([Embedder(torch.nn.Flatten()).embed(batch) for batch in cache.batches(4)])
    # A Flatten "model": the rows are the flattened, normalised images the model would receive.
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(cached, torch.nn.functional.normalize(expected.flatten(1), dim=1), rtol=0, atol=0)


def test_evaluation_matches_the_reference_pipeline(data_dir, tmp_path, write_checkpoint):
    """The cached uint8 crops give the similarities of the reference's loader (eval_transform per
    checkpoint), and every prediction is the class of a most similar other image."""
    path = tmp_path / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(path, "se_resnet50", crop_size=CROP, attention=False)
    result = evaluate_checkpoint(path, data_dir, protocol="test", batch_size=4, device="cpu")

    loaded = load_model(path)
    dataset = KimiaDataset(data_dir / "test", eval_transform(CROP))
    with torch.no_grad():
        reference = loaded.model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    reference_similarity = sum(e @ e.T for e in reference) / len(reference)
    with Evaluator(data_dir, device="cpu") as evaluator:
        cache, names = evaluator.decoded("test", CROP)
        assert names == [dataset.classes[label] for label in dataset.targets]
        ours = Embedder(loaded.model, batch_size=4).embed(cache.batches(4))
        nhwc = Embedder(loaded.model, batch_size=4, channels_last=True).embed(cache.batches(3))
    torch.testing.assert_close(ours @ ours.T, reference_similarity, atol=1e-5, rtol=0)
    torch.testing.assert_close(nhwc, ours, atol=1e-5, rtol=0)  # --channels-last: the same to float rounding
    torch.testing.assert_close(result["query_embeddings"], ours, atol=0, rtol=0)
    assert result["query_labels"] == dataset.targets

    reference_similarity.fill_diagonal_(float("-inf"))  # the query itself, excluded by index
    best = reference_similarity.max(dim=1, keepdim=True).values
    targets = torch.tensor(dataset.targets)
    for query, predicted in enumerate(result["predicted"]):
        near_best = reference_similarity[query] >= best[query] - 1e-5
        assert predicted in targets[near_best].tolist()
    expected = kimia_accuracy(dataset.targets, result["predicted"], num_classes=3)
    np.testing.assert_array_equal(result["confusion"], expected["confusion"])
    assert result["eta_total"] == pytest.approx(expected["eta_total"])
    assert result["num_queries"] == 9 and result["num_gallery"] == 9 and result["protocol"] == "test"
    assert result["num_lone_queries"] == 1  # s2's single image has nothing to find
    assert result["crop_size"] == CROP and result["class_names"] == list(CLASSES)


def test_train_protocol_searches_the_training_set(data_dir, tmp_path, write_checkpoint):
    path = tmp_path / "resnet50_MSLoss_0.5000.pth"
    write_checkpoint(path, "resnet50", crop_size=24, embedding_dim=64)
    loaded = load_model(path)
    assert loaded.crop_size == 24 and loaded.model.num_learners == 4
    with Evaluator(data_dir, batch_size=8, device="cpu") as evaluator:
        test, train = evaluator.evaluate(loaded, ("test", "train"))
    assert (test["protocol"], train["protocol"]) == ("test", "train")
    assert train["num_queries"] == 9 and train["num_gallery"] == 6 and train["num_lone_queries"] == 0
    assert train["confusion"].sum() == 9 and np.trace(train["confusion"]) == train["correct"]


def test_bare_reference_state_dict_architecture_from_name_and_keys(tmp_path):
    path = tmp_path / "se_resnet_MsLoss_0.7590.pth"
    torch.save(models.build_model("se_resnet50", attention=False).state_dict(), path)
    loaded = load_model(path)
    assert loaded.model_name == "se_resnet50" and loaded.source == "reference state_dict"
    assert loaded.model_options == {"embedding_dim": 512, "num_learners": 1, "attention": False}
    assert loaded.crop_size == 224 and loaded.class_names is None
    assert load_model(path, crop_size=64).crop_size == 64


@pytest.mark.parametrize("name, content, message", [
    ("broken.pth", b"\x00not a torch file", r"broken\.pth: not a PyTorch checkpoint \(neither the zip archive nor the "
                                            r"pickle that torch\.save writes\)$"),
    ("empty.pth", b"", r"empty\.pth: not a PyTorch checkpoint \(an empty file\)$"),
    ("cut.pth", "cut", r"cut\.pth: a damaged PyTorch checkpoint \(PytorchStreamReader failed reading zip archive: "
                       r"failed finding central directory\)$"),
    ("list.pth", [1, 2], r"list\.pth: not a checkpoint \(holds a list"),
    ("weights.pth", {"w": torch.zeros(2)}, r"weights\.pth: a bare state_dict whose name does not start with ABE_M_"),
    ("ABE_M_x.pth", {"w": torch.zeros(2)}, r"ABE_M_x\.pth: does not fit ABE_M .*missing keys"),
])
def test_unusable_files_are_named_with_the_reason(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "cut":  # a zip-format checkpoint cut short, as an interrupted copy leaves it
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


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


def tiny_checkpoint(path: Path, val_loss: float | None, best_val_loss: float | None = None, epoch: int = 0,
                    model_name: str = "se_resnet50", loss_name: str = "MSLoss") -> None:
    """A train.py-style dict with a one-tensor model: enough for the selection, which reads no weights."""
    content = {"model": {"w": torch.zeros(1)}, "model_name": model_name, "loss_name": loss_name, "epoch": epoch,
               "best_val_loss": val_loss if best_val_loss is None else best_val_loss}
    if val_loss is not None:
        content["val_loss"] = val_loss
    torch.save(content, path)


def test_select_checkpoints_labels_the_newest_best_of_each_run(tmp_path):
    folder, other, last_only = tmp_path / "model", tmp_path / "other", tmp_path / "last_only"
    for f in (folder, other, last_only):
        f.mkdir()
    tiny_checkpoint(folder / "se_resnet50_MSLoss_0.5000.pth", 0.5, epoch=0)
    tiny_checkpoint(folder / "se_resnet50_MSLoss_0.3000.pth", 0.3, epoch=3)
    tiny_checkpoint(folder / "checkpoint.pth", 0.4, best_val_loss=0.3, epoch=5)
    (folder / "se_resnet50_MSLoss_0.0100.pth").write_bytes(b"truncated")  # unreadable: its name is no candidate
    # Equal losses (two runs into one folder): the later epoch, although its name sorts after.
    tiny_checkpoint(folder / "ABE_M_ABELoss_0.2000.pth", 0.2, epoch=1, model_name="ABE_M", loss_name="ABELoss")
    tiny_checkpoint(folder / "ABE_M_ABELoss_0.2000_resumed.pth", 0.2, epoch=4, model_name="ABE_M", loss_name="ABELoss")
    for name in ("se_resnet_MsLoss_0.7590.pth", "se_resnet_MsLoss_0.6000.pth", "0.2se_resnet_MsLoss_0.9000.pth",
                 "se_resnet_MsLoss_final.pth"):
        torch.save({"conv.weight": torch.zeros(1)}, folder / name)  # the reference's bare state_dicts
    tiny_checkpoint(other / "se_resnet50_MSLoss_0.9000.pth", 0.9)  # another folder: its own run
    tiny_checkpoint(last_only / "checkpoint.pth", 0.3)  # the last epoch is never a selection, even when best

    paths = sorted(folder.iterdir()) + [str(other / "se_resnet50_MSLoss_0.9000.pth"), last_only / "checkpoint.pth"]
    labels = selection.select_checkpoints(paths)
    assert list(labels) == paths  # keys as given, str or Path
    assert {str(Path(k).relative_to(tmp_path)): v for k, v in labels.items()} == {
        "model/se_resnet50_MSLoss_0.5000.pth": "",
        "model/se_resnet50_MSLoss_0.3000.pth": "validation",
        "model/checkpoint.pth": "last_epoch",
        "model/se_resnet50_MSLoss_0.0100.pth": "",
        "model/ABE_M_ABELoss_0.2000.pth": "",
        "model/ABE_M_ABELoss_0.2000_resumed.pth": "validation",
        "model/se_resnet_MsLoss_0.7590.pth": "",
        "model/se_resnet_MsLoss_0.6000.pth": "validation",
        "model/0.2se_resnet_MsLoss_0.9000.pth": "validation",  # the ratio prefix makes its own run
        "model/se_resnet_MsLoss_final.pth": "",
        "other/se_resnet50_MSLoss_0.9000.pth": "validation",
        "last_only/checkpoint.pth": "last_epoch",
    }


def test_validation_loss_from_the_dict_else_the_name(tmp_path):
    tiny_checkpoint(tmp_path / "se_resnet50_MSLoss_0.3000.pth", 0.30001234)
    tiny_checkpoint(tmp_path / "se_resnet50_MSLoss_0.2500.pth", None)  # a dict without the key
    tiny_checkpoint(tmp_path / "renamed.pth", None)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_0.7590.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_best.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_0.4200.pth",
               _use_new_zipfile_serialization=False)  # the legacy format, which cannot be memory-mapped
    (tmp_path / "se_resnet_MsLoss_0.1000.pth").write_bytes(b"truncated")
    assert selection.validation_loss(tmp_path / "se_resnet50_MSLoss_0.3000.pth") == 0.30001234  # unrounded
    assert selection.validation_loss(tmp_path / "se_resnet50_MSLoss_0.2500.pth") == 0.25
    assert selection.validation_loss(tmp_path / "se_resnet_MsLoss_0.7590.pth") == 0.759
    assert selection.validation_loss(tmp_path / "se_resnet_MsLoss_0.4200.pth") == 0.42
    for name in ("renamed.pth", "se_resnet_MsLoss_best.pth", "se_resnet_MsLoss_0.1000.pth"):
        assert selection.validation_loss(tmp_path / name) is None, name
    described = selection.describe_checkpoint(tmp_path / "se_resnet_MsLoss_best.pth")
    assert (described.run, described.candidate) == ("", False)


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


class _TwoLearners(torch.nn.Module):
    """A tiny stand-in with the models' interface: a list of M unit-norm embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.linear = torch.nn.Linear(8, 6)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.linear(self.conv(images).mean(dim=(2, 3)))
        return [torch.nn.functional.normalize(part, dim=1) for part in features.split(3, dim=1)]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_keeps_embeddings_float32_and_close(amp):
    torch.manual_seed(0)
    model = _TwoLearners().eval()
    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    exact = Embedder(model, batch_size=2).embed(images)
    mixed = Embedder(model, batch_size=2, amp=amp).embed([images[:3], images[3:]])
    assert mixed.dtype == torch.float32 and mixed.shape == (5, 6)
    torch.testing.assert_close(mixed.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(mixed, exact, atol=3e-2, rtol=0)
    with torch.inference_mode():
        learners = model(images.float() / 255)
    torch.testing.assert_close(exact @ exact.T, sum(e @ e.T for e in learners) / 2)


def test_crop_cache_round_trip_keeps_no_file_and_reports_unreadable_images(tmp_path, make_images):
    make_images(tmp_path / "images", {"s0": 3, "s1": 4}, size=36, seed=7)
    paths = sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    broken = tmp_path / "images" / "s1" / "s1_broken.png"
    broken.write_bytes(b"not a png")
    paths.insert(2, str(broken))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with CropCache(paths, CROP, directory=cache_dir, batch_size=3) as cache:
        assert cache.kept == [0, 1, 3, 4, 5, 6, 7]
        assert [(Path(p).name, bool(reason)) for p, reason in cache.failed] == [("s1_broken.png", True)]
        assert len(cache) == 7 and cache.num_bytes == 7 * 3 * CROP * CROP
        assert list(cache_dir.iterdir()) == []  # the file has no name: nothing to leave behind
        sizes = [len(batch) for batch in cache.batches(4)]
        crops = torch.cat(list(cache.batches(2)))
    assert sizes == [4, 3]
    expected = torch.stack([eval_crop(CROP)(Image.open(paths[i]).convert("RGB")) for i in cache.kept])
    assert crops.dtype == torch.uint8 and torch.equal(crops, expected)
    assert list(cache_dir.iterdir()) == []


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


def test_tsne_separates_well_separated_classes_and_is_seeded(tmp_path):
    generator = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=1) * 4
    points = torch.cat([centre + 0.1 * torch.randn(12, 16, generator=generator) for centre in centres])
    labels = np.repeat(np.arange(3), 12)
    coordinates = evaluation.tsne_coordinates(points, seed=0)
    assert coordinates.shape == (36, 2)
    np.testing.assert_array_equal(coordinates, evaluation.tsne_coordinates(points, seed=0))
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=2)
    same = labels[:, None] == labels[None]
    farthest_of_its_class = np.where(same & ~np.eye(36, dtype=bool), distances, -np.inf).max(axis=1)
    nearest_of_another = np.where(same, np.inf, distances).min(axis=1)
    # Every point lies nearer to each point of its class than to any point of another class.
    assert (farthest_of_its_class < nearest_of_another).all()
    path = tmp_path / "map.png"
    evaluation.plot_embeddings(path, coordinates, labels, ["s0", "s1", "s2"], "three classes")
    assert Image.open(path).size == tuple(round(x * evaluation.TSNE_DPI) for x in evaluation.TSNE_FIGURE_INCHES)
    with pytest.raises(multi_test.UserError, match="at least 3 images"):
        evaluation.tsne_coordinates(points[:2])
