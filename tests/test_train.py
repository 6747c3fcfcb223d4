"""train.py and train_traindata.py on small generated data (ABE_M / se_resnet50 at 64 px crops), and the
training loop (histo_retrieval.training.loop). The sampler, the data sets and the collectives have their own
tests: test_sampler.py, test_datasets.py, test_distributed.py."""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import losses
import models
import train
import train_traindata
from histo_retrieval.training import loop as training
from histo_retrieval.distributed import run_distributed_script
from histo_retrieval.errors import UserError
from histo_retrieval.runtime import DEFAULT_WORKERS

REPO = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((REPO / "tests" / "data" / "state_dict_layout.json").read_text())


def last_epoch(folder: Path) -> Path:
    """The one run's last-epoch checkpoint in `folder` (`<identity>_checkpoint.pth`)."""
    found = sorted(folder.glob("*_checkpoint.pth"))
    assert len(found) == 1, found
    return found[0]


def layout(model_name: str) -> list[tuple[str, list[int]]]:
    """The reference's state_dict keys and shapes, in order."""
    return [(key, shape) for key, shape in LAYOUT[model_name]["state_dict"]]


def keys_and_shapes(state_dict: dict) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in state_dict.items()]
CHECKPOINT_KEYS = {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "model_name", "loss_name",
                   "model_options", "class_names", "crop_size", "history", "val_loss", "best_val_loss", "seed", "command"}
# Small and quick: 64 px crops of 72 px images, batches of 6 (the 6 validation images make one full batch,
# which the reference's validation loader needs), no loader processes.
QUICK = ["--crop-size", "64", "--batch-size", "6", "--workers", "0", "--val-ratio", "0.25", "--device", "cpu"]
# One thread per process: on a machine whose few cores are busy, more threads stall each other.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_images(root: Path, per_class: dict[str, int], size: int = 72) -> Path:
    """Random-texture PNGs in `root/<class>/<class>_<i>.png`, each class with its own mean colour."""
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        mean = rng.uniform(60, 200, 3)
        for i in range(count):
            pixels = np.clip(mean + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("KIMIA_data")
    make_images(root / "train", {"s0": 12, "s1": 12})
    make_images(root / "test", {"s0": 5, "s1": 5})
    return root


def parse(*argv: str) -> object:
    return train.get_args_parser().parse_args([str(a) for a in argv])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.pth") if not p.name.endswith("_checkpoint.pth"))


# ----------------------------------------------------------------------------- end-to-end
@pytest.mark.slow
def test_two_epochs_write_both_checkpoints_log_and_plot(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    # The reference's spellings of the names; the files must carry the canonical ones.
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "se_resnet", "MsLoss", "--data-dir",
                             data_root / "train", "--output-dir", out, "--epochs", "2", *QUICK],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/2" in result.stdout and "epoch 2/2" in result.stdout

    last = load(last_epoch(out))
    assert CHECKPOINT_KEYS <= set(last)
    assert last["epoch"] == 1 and last["model_name"] == "se_resnet50" and last["loss_name"] == "MSLoss"
    assert last["model_options"] == {"embedding_dim": 512, "num_learners": 1, "attention": True}
    assert last["class_names"] == ["s0", "s1"] and last["crop_size"] == 64 and last["seed"] == 1
    assert "train.py se_resnet MsLoss" in last["command"]
    assert keys_and_shapes(last["model"]) == layout("se_resnet50")
    assert all(t.device.type == "cpu" for t in last["model"].values())
    assert [h["epoch"] for h in last["history"]] == [0, 1]
    assert last["lr_scheduler"]["last_epoch"] == 2

    best_val = min(h["val_loss"] for h in last["history"])
    bests = best_checkpoints(out)
    assert bests and bests[-1].name == f"se_resnet50_MSLoss_{best_val:.4f}.pth"
    assert load(bests[-1])["val_loss"] == pytest.approx(best_val)

    rows = read_csv(out / "se_resnet50_MSLoss_log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row, h in zip(rows, last["history"]):
        assert float(row["train_loss"]) == pytest.approx(h["train_loss"])
        assert float(row["val_loss"]) == pytest.approx(h["val_loss"])
        assert float(row["lr"]) == pytest.approx(0.001) and float(row["images_per_s"]) > 0
        assert int(row["train_batches"]) == 18 // 6 and 0 <= int(row["skipped_batches"]) <= 3
    with Image.open(out / "se_resnet50_MSLoss_loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert not list(out.glob(".*.tmp"))


def uninterrupted_run(data_root: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                     "--epochs", epochs, *QUICK, *extra))
    return load(last_epoch(out))


@pytest.mark.slow
def test_killed_run_resumes_at_next_epoch_with_identical_state(data_root: Path, tmp_path: Path) -> None:
    # The scheduler state must survive the restart, and loader processes must repeat their augmentation.
    extra = ["--lr-step", "1", "--lr-gamma", "0.5", "--workers", "2"]
    reference = uninterrupted_run(data_root, tmp_path / "straight", 3, extra)

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "ABE_M", "ContrastiveLoss", "--data-dir",
                                data_root / "train", "--output-dir", out, "--epochs", "50", *QUICK, *extra],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(out.glob("*_checkpoint.pth")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = load(last_epoch(out))["epoch"]
    assert killed_at < 2

    result = train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                              "--epochs", 3, *QUICK, *extra, "--resume", last_epoch(out)))
    resumed = load(last_epoch(out))
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert resumed["epoch"] == 2
    assert resumed["lr_scheduler"] == reference["lr_scheduler"]
    assert [h["lr"] for h in resumed["history"]] == [0.001, 0.0005, 0.00025]
    # Data order and augmentation depend only on (seed, epoch): the resumed run is the uninterrupted one.
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for index, state in reference["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in reference["history"]],
                                                                        rel=1e-5)
    assert [int(r["epoch"]) for r in read_csv(out / "ABE_M_ContrastiveLoss_log.csv")] == [0, 1, 2]
    assert result["best_checkpoint"] and Path(result["best_checkpoint"]).exists()


def test_keep_best_removes_older_best_checkpoints_of_the_run(data_root: Path, tmp_path: Path,
                                                             stub_epochs: list[int]) -> None:
    out = tmp_path / "model"
    result = train.main(parse("ABE_M", "MSLoss", "--data-dir", data_root / "train", "--output-dir", out,
                              "--epochs", "4", "--keep-best", "1", *QUICK))
    val_losses = [h["val_loss"] for h in result["history"]]
    assert val_losses == sorted(val_losses, reverse=True)  # the stub improves every epoch: 3 removals
    assert best_checkpoints(out) == [Path(result["best_checkpoint"])]
    assert load(last_epoch(out))["best_val_loss"] == pytest.approx(min(val_losses))


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo_with_pk_batches(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), "ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train",
               "--output-dir", out, "--epochs", "1", "--sampler", "pk", "--samples-per-class", "2",
               *QUICK, "--batch-size", "4"]
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    assert len(best_checkpoints(out)) == 1
    last = load(last_epoch(out))
    assert last["epoch"] == 0 and keys_and_shapes(last["model"]) == layout("ABE_M")
    # 18 training images, 4 per process and step, 2 processes: 2 steps each.
    assert last["history"][0]["train_batches"] == 4
    assert len(read_csv(out / "ABE_M_ContrastiveLoss_log.csv")) == 1


def test_train_traindata_defaults_are_the_references() -> None:
    args = train_traindata.get_args_parser().parse_args([])
    assert (args.model, args.loss, args.ratios, args.batch_size) == ("se_resnet50", "MSLoss", [0.2, 0.4, 0.6, 0.8], 20)
    assert (args.main_weights, args.skip_main, args.main_batch_size) == (None, False, 60)


@pytest.mark.slow
def test_train_traindata_trains_the_ratios_and_the_main_experiment(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "traindata"
    args = train_traindata.get_args_parser().parse_args(
        ["ABE_M", "ContrastiveLoss", "--ratios", "0.5", "--data-dir", str(data_root / "train"),
         "--output-dir", str(out), "--epochs", "1", *QUICK, "--batch-size", "4", "--val-batches", "fixed",
         "--main-batch-size", "6"])
    rows = train_traindata.main(args)
    table = read_csv(out / "traindata_results.csv")
    assert [list(r)[:5] for r in table] == [["ratio", "images_used", "eta_p", "eta_W", "eta_total"]] * 2
    assert [float(r["ratio"]) for r in table] == [0.5, 1.0]
    assert [int(r["images_used"]) for r in table] == [12, 24]  # int(12 * r) of each of the 2 classes
    assert [r["run"] for r in table] == ["ratio 0.5, batch 4", f"main experiment, batch 6, trained in {out / 'main'}"]
    for row in table:
        eta_p, eta_w, eta_total = (float(row[k]) for k in ("eta_p", "eta_W", "eta_total"))
        assert 0 <= eta_p <= 1 and 0 <= eta_w <= 1 and eta_total == pytest.approx(eta_p * eta_w)
        assert row["protocol"] == "test" and row["selected_by"] == "validation" and Path(row["checkpoint"]).exists()
        assert row["unreadable_images"] == "0"
    assert [Path(r["checkpoint"]).parent.name for r in rows] == ["ratio_0.5", "main"]
    assert load(Path(rows[1]["checkpoint"]))["args"]["batch_size"] == 6
    with Image.open(out / "traindata_results.png") as png:
        assert png.format == "PNG"


def test_train_traindata_takes_the_100_percent_bar_from_the_main_weights(
        data_root: Path, tmp_path: Path, stub_epochs: list[int]) -> None:
    main_dir = tmp_path / "main_run"
    common = ["--data-dir", str(data_root / "train"), "--epochs", "3", *QUICK]
    main_run = train.main(parse("ABE_M", "ContrastiveLoss", *common, "--output-dir", main_dir))
    assert len(best_checkpoints(main_dir)) == 3  # the stub's validation loss improves every epoch
    args = train_traindata.get_args_parser().parse_args(
        ["ABE_M", "ContrastiveLoss", "--ratios", "0.5", *common, "--val-batches", "fixed", "--output-dir",
         str(tmp_path / "traindata"), "--main-weights", str(main_dir)])
    rows = train_traindata.main(args)
    assert [r["run"] for r in rows] == ["ratio 0.5, batch 6", f"main experiment, given as --main-weights {main_dir}"]
    assert rows[1]["checkpoint"] == main_run["best_checkpoint"]  # the newest best, not checkpoint.pth
    assert [r["unreadable_images"] for r in rows] == [0, ""]
    args.output_dir = str(tmp_path / "traindata_again")  # the first sweep's folder holds its runs: a new one
    assert train_traindata.command(args) == 0
    assert not (tmp_path / "traindata" / "main").exists()
    with pytest.raises(UserError, match=r"--main-weights .*: expected one ABE_M_MSLoss_<val_loss>\.pth run, found none"):
        train_traindata.main(train_traindata.get_args_parser().parse_args(
            ["ABE_M", "MSLoss", *common, "--output-dir", str(tmp_path / "other"), "--main-weights", str(main_dir)]))


# ----------------------------------------------------------------------------- the loop's pieces (histo_retrieval.training.loop)
def test_loss_hyper_parameters_reach_only_their_loss() -> None:
    _, loss_name, _, options = training.resolve_names(parse("abe_m", "msloss", "--ms-beta", "50", "--ms-eps", "0.1",
                                                         "--margin", "0.9"))
    assert loss_name == "MSLoss" and options == {"alpha": 2.0, "beta": 50.0, "lam": 0.5, "eps": 0.1,
                                                 "self_pair": "reference"}
    _, _, model_options, options = training.resolve_names(parse("se_resnet", "ABELoss", "--no-attention",
                                                             "--self-pair", "exclude"))
    assert options == {"lambda_div": 0.05, "margin_c": 0.5, "margin_div": 0.2, "self_pair": "exclude"}
    assert model_options == {"embedding_dim": 512, "attention": False}


def test_resolved_names_and_the_complete_model_options_of_the_checkpoint() -> None:
    names = training.resolve_names(parse("ABE_M", "ContrastiveLoss", "--embedding-dim", "256"))
    assert (names.model_name, names.loss_name) == ("ABE_M", "ContrastiveLoss")
    assert names.requested_model_options == {"embedding_dim": 256}  # num_learners only when given
    model, model_options = training.build_training_model(names.model_name, names.requested_model_options)
    # The stored options are complete: the learner count is the model's own default, 4 for ABE_M.
    assert model_options == {"embedding_dim": 256, "num_learners": models.default_model_options("ABE_M")["num_learners"]} \
        == {"embedding_dim": 256, "num_learners": 4}
    assert [tuple(e.shape) for e in model.eval()(torch.zeros(1, 3, 64, 64))] == [(1, 64)] * 4
    with pytest.raises(UserError, match=r"ABE_M: .*embedding_dim"):
        training.build_training_model("ABE_M", {"embedding_dim": 255})


def test_both_scripts_share_the_training_arguments_and_their_defaults() -> None:
    shared = vars(training.add_training_arguments(argparse.ArgumentParser()).parse_args([]))
    trained = vars(parse("ABE_M", "MSLoss"))
    traindata = vars(train_traindata.get_args_parser().parse_args([]))
    assert {key: trained[key] for key in shared} == shared
    # train_traindata changes exactly two defaults: the reference's batch 20 and its own output folder.
    assert {key: traindata[key] for key in shared} == {**shared, "batch_size": 20, "output_dir": "model/traindata"}
    # The runtime flags are histo_retrieval.runtime's, with its one --workers default.
    runtime = (shared["workers"], shared["amp"], shared["amp_force"], shared["channels_last"], shared["device"])
    assert runtime == (DEFAULT_WORKERS, "off", False, False, None)
    for parser in (train.get_args_parser(), train_traindata.get_args_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in action.help, action.option_strings
                assert all(flag == flag.lower() and "_" not in flag for flag in action.option_strings)


class TinyEmbedder(torch.nn.Module):
    """Linear embeddings of 2 x 2 images behind a dropout, so that train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout = torch.nn.Linear(12, 4), torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.normalize(self.dropout(self.linear(x.flatten(1))), dim=1)]


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """Loader-shaped batches: an ordinary one, one whose images were all unreadable, one of a single
    class (no negative: the loss skips every anchor), and one more."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(n, 3, 2, 2, generator=generator) for n in (6, 4, 6)]
    return [(images[0], torch.tensor([0, 0, 0, 1, 1, 1]), [("a.png", "broken")]),
            (torch.empty(0), torch.empty(0, dtype=torch.long), [("b.png", "broken"), ("c.png", "broken")]),
            (images[1], torch.tensor([1, 1, 1, 1]), []),
            (images[2], torch.tensor([0, 1, 0, 1, 0, 1]), [])]


TINY_ARGS = argparse.Namespace(amp="off", channels_last=False, gather_embeddings=False, epochs=1)


def test_validate_is_the_eval_mode_mean_of_the_batch_losses() -> None:
    torch.manual_seed(0)
    model, criterion = TinyEmbedder(), losses.build_loss("MSLoss")
    loss, unreadable = training.validate(model.train(), criterion, tiny_batches(), torch.device("cpu"), TINY_ARGS)
    assert not model.training
    with torch.no_grad():
        # Naively: every readable batch counts, the one without negatives with its loss of 0.
        batch_losses = [float(criterion(model(x), labels)) for x, labels, _ in tiny_batches() if len(x)]
    assert batch_losses[1] == 0.0 and len(batch_losses) == 3
    assert loss == pytest.approx(sum(batch_losses) / 3, rel=1e-6)
    assert unreadable == [("a.png", "broken"), ("b.png", "broken"), ("c.png", "broken")]


def test_train_one_epoch_steps_like_a_plain_sgd_loop_and_skips_batches_without_anchors() -> None:
    criterion = losses.build_loss("ContrastiveLoss")
    torch.manual_seed(0)
    model = TinyEmbedder()
    naive = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    torch.manual_seed(1)  # the dropout masks, drawn again for the naive loop
    stats = training.train_one_epoch(model, criterion, optimizer, tiny_batches(), torch.device("cpu"), TINY_ARGS,
                                     None, 0, False)
    torch.manual_seed(1)
    naive_optimizer = torch.optim.SGD(naive.parameters(), lr=0.5, momentum=0.9)
    naive_losses, naive_skipped = [], 0
    for x, labels, _ in tiny_batches():
        if len(x):
            naive_optimizer.zero_grad()
            loss = criterion(naive(x), labels)
            loss.backward()
            if criterion.stats["anchors"] > 0:
                naive_optimizer.step()
            else:
                naive_skipped += 1
            naive_losses.append(loss.item())
    for (name, value), naive_value in zip(model.state_dict().items(), naive.state_dict().values()):
        torch.testing.assert_close(value, naive_value, msg=name)
    assert naive_skipped == 1 and stats["skipped_batches"] == 1 and stats["nonfinite_batches"] == 0
    # The mean runs over the loader's batches, the unreadable one included (as over DDP's steps).
    assert stats["train_batches"] == 4 and stats["train_loss"] == pytest.approx(sum(naive_losses) / 4, rel=1e-6)
    assert [path for path, _ in stats["unreadable"]] == ["a.png", "b.png", "c.png"]


def test_command_exits_1_when_images_were_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    for result, status in (({"unreadable": [("a.png", "broken")]}, 1), ({"unreadable": []}, 0), ({}, 0)):
        monkeypatch.setattr(train, "main", lambda args, result=result: result)
        assert train.command(argparse.Namespace()) == status


def test_summary_prints_the_model_without_data(capsys: pytest.CaptureFixture) -> None:
    assert train.main(parse("ABE_M", "MSLoss", "--summary", "--crop-size", "64", "--data-dir", "/nonexistent")) == {}
    text = capsys.readouterr().out
    assert "Total params: 10,534,720" in text


@pytest.mark.slow
def test_non_finite_loss_stops_before_writing_and_keeps_last_good_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build_loss = losses.build_loss

    class NanAfterTwoSteps(torch.nn.Module):
        """The real loss for the 3 training steps of epoch 1, NaN from then on."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.steps = inner, 0

        def forward(self, embeddings: list, labels: torch.Tensor) -> torch.Tensor:
            loss = self.inner(embeddings, labels)
            self.steps += torch.is_grad_enabled()
            return loss * float("nan") if self.steps > 3 else loss

        @property
        def stats(self) -> dict:
            return self.inner.stats

    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: NanAfterTwoSteps(real_build_loss(*a, **k)))
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"epoch 2: the loss became non-finite .*checkpoint\.pth.*lower --lr"):
        train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                         "--epochs", "3", *QUICK))
    assert load(last_epoch(out))["epoch"] == 0
    assert len(read_csv(out / "ABE_M_ContrastiveLoss_log.csv")) == 1


@pytest.mark.slow
def test_a_corrupt_image_is_left_out_and_reported(data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "train"
    shutil.copytree(data_root / "train", data)
    corrupt = data / "s1" / "s1_99.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    result = train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data, "--output-dir", tmp_path / "out",
                              "--epochs", "1", *QUICK))
    assert [path for path, _ in result["unreadable"]] == [str(corrupt)]
    assert f"1 unreadable image(s) were left out:\n  {corrupt} (" in capsys.readouterr().err
    assert load(last_epoch(tmp_path / "out"))["epoch"] == 0
    assert corrupt.read_bytes() == b"\x89PNG\r\n\x1a\n not really a PNG"  # the user's data is left alone


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("argv, message", [
    (["VGG16", "MSLoss"], r"unknown model 'VGG16'; choose one of se_resnet50, resnet50, ABE_M"),
    (["ABE_M", "Triplet"], r"unknown loss 'Triplet'; choose one of"),
    (["ABE_M", "MSLoss", "--no-attention"], r"--no-attention applies to se_resnet50 only"),
    (["ABE_M", "MSLoss", "--batch-size", "1"], r"--batch-size must be at least 2"),
    (["ABE_M", "MSLoss", "--amp", "fp16", "--device", "cpu"], r"--amp fp16 needs CUDA"),
])
def test_bad_arguments_fail_before_training(argv: list, message: str, data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train.main(parse(*argv, "--data-dir", data_root / "train", "--output-dir", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_data_fails_before_training(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def fails(data_dir: Path, *extra: str) -> str:
        with pytest.raises(UserError) as err:
            train.main(parse("ABE_M", "MSLoss", "--data-dir", data_dir, "--output-dir", out, *QUICK, *extra))
        return str(err.value)

    assert "no such folder" in fails(tmp_path / "missing")
    (tmp_path / "empty" / "s0").mkdir(parents=True)
    assert "no images found" in fails(tmp_path / "empty")
    small = make_images(tmp_path / "small", {"s0": 12, "s1": 1})
    assert re.match(rf"{re.escape(str(small / 's1'))}: [01] image\(s\) left for training", fails(small))
    assert "--batch-size 30 is larger than the 18 training images" in fails(data_root / "train", "--batch-size", "30")
    assert re.search(r"--crop-size 100 is larger than the images \(.*s0_0\.png is 72x72\)",
                     fails(data_root / "train", "--crop-size", "100"))
    assert not out.exists()


def write_unreadable(root: Path, per_class: dict[str, int]) -> Path:
    """`root/<class>/<class>_<i>.png` files that no decoder reads."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{name}_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    return root


def test_no_readable_training_image_stops_before_writing_anything(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data = write_unreadable(tmp_path / "unreadable", {"s0": 8, "s1": 8})
    out = tmp_path / "out"
    args = parse("ABE_M", "MSLoss", "--data-dir", data, "--output-dir", out, "--epochs", 2, "--val-batches", "fixed",
                 *QUICK)
    assert run_distributed_script(train.command, args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}: no training batch of epoch 1 could be formed: none "
                                               f"of its 12 image(s) could be read, e.g. {data}")
    assert err[0].endswith("; replace or remove the unreadable images")
    assert not list(out.glob("**/*.pth"))  # (the glob of a missing folder is empty)
    assert not out.exists() or not any(out.iterdir())


def test_no_readable_validation_image_stops_before_writing_anything(data_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "train"
    shutil.copytree(data_root / "train", data)
    args = parse("ABE_M", "MSLoss", "--data-dir", data, "--output-dir", tmp_path / "out", "--epochs", 1,
                 "--val-batches", "fixed", *QUICK)
    dataset, _, val_indices, _ = training.build_datasets(args)
    for index in val_indices:
        Path(dataset.samples[index][0]).write_bytes(b"not an image")
    with pytest.raises(UserError) as err:
        train.main(args)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{data}: no validation batch could be formed: none of its 6 image(s) could be read")
    assert message.endswith("replace or remove the unreadable images, or raise --val-ratio")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resume_refuses_another_models_checkpoint(data_root: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {}, "optimizer": {}, "model_name": "resnet50", "loss_name": "ContrastiveLoss",
                "model_options": {}, "class_names": ["s0", "s1"]}, foreign)
    args = ("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", tmp_path / "out", *QUICK)
    with pytest.raises(UserError, match=r"its model_name is 'resnet50' but this run's is 'ABE_M'"):
        train.main(parse(*args, "--resume", foreign))
    with pytest.raises(UserError, match=r"--resume .*missing\.pth: no such file"):
        train.main(parse(*args, "--resume", tmp_path / "missing.pth"))


@pytest.mark.slow
def test_script_prints_one_line_error_and_exits_non_zero(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "ABE_M", "MSLoss", "--data-dir", tmp_path / "nope"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such folder; run "
                                                  "KIMIA_data/data_process.py first or pass the right --data-dir"]


# ----------------------------------------------------------------------------- schedule, validation, resume
def test_reference_validation_needs_one_full_batch(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"the 6 validation images make no full batch of 8; .*--val-batches fixed"):
        train.main(parse("ABE_M", "MSLoss", "--data-dir", data_root / "train", "--output-dir", tmp_path, *QUICK,
                         "--batch-size", "8"))


@pytest.fixture
def stub_epochs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the training and validation passes with stubs, so that the epoch loop (schedule, checkpoints,
    resume) runs in a fraction of a second per epoch. The validation loss falls every epoch."""
    calls: list[int] = []

    def train_one_epoch(model, criterion, optimizer, loader, device, args, scaler, epoch, show_progress):
        calls.append(epoch)
        optimizer.step()  # no gradients: the weights stay, but the scheduler sees the usual order
        return {"train_loss": 1.0, "skipped_batches": 0, "train_batches": len(loader), "nonfinite_batches": 0,
                "images_per_s": 1.0, "unreadable": []}

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(train, "validate", lambda *args: (1.0 / (len(calls) + 1), []))
    return calls


def naive_lr(epoch: int, lr: float, step: int, gamma: float, at: str) -> float:
    """StepLR's learning rate in (0-based) epoch `epoch`: stepped after each epoch, or, as the reference
    code runs on PyTorch >= 1.1, once before each epoch's first step."""
    return lr * gamma ** ((epoch + (at == "start")) // step)


@pytest.mark.parametrize("step, gamma, at", [(50, 0.1, "end"), (50, 0.1, "start"), (2, 0.1, "end"),
                                             (2, 0.1, "start"), (3, 0.5, "start"), (1, 0.5, "end")])
def test_learning_rate_sequence_straight_and_resumed(step: int, gamma: float, at: str, data_root: Path,
                                                     tmp_path: Path, stub_epochs: list[int]) -> None:
    epochs = 7
    expected = [naive_lr(e, 0.001, step, gamma, at) for e in range(epochs)]
    common = ("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", *QUICK, "--lr-step", step,
              "--lr-gamma", gamma, "--lr-step-at", at)
    straight = train.main(parse(*common, "--output-dir", tmp_path / "straight", "--epochs", epochs))
    assert [h["lr"] for h in straight["history"]] == pytest.approx(expected, rel=1e-12)
    rows = read_csv(tmp_path / "straight" / "ABE_M_ContrastiveLoss_log.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-12)

    train.main(parse(*common, "--output-dir", tmp_path / "resumed", "--epochs", 3))
    resumed = train.main(parse(*common, "--output-dir", tmp_path / "resumed", "--epochs", epochs,
                               "--resume", last_epoch(tmp_path / "resumed")))
    assert [h["lr"] for h in resumed["history"]] == pytest.approx(expected, rel=1e-12)
    assert stub_epochs == [*range(epochs), 0, 1, 2, *range(3, epochs)]


def test_the_reference_schedule_on_current_pytorch_is_49_50_1() -> None:
    lrs = [naive_lr(e, 0.001, 50, 0.1, "start") for e in range(100)]
    assert (sum(x == pytest.approx(1e-3) for x in lrs), sum(x == pytest.approx(1e-4) for x in lrs),
            sum(x == pytest.approx(1e-5) for x in lrs)) == (49, 50, 1)


@pytest.fixture
def one_epoch_checkpoint(data_root: Path, tmp_path: Path, stub_epochs: list[int]) -> Path:
    train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", tmp_path / "first",
                     "--epochs", 1, *QUICK))
    return last_epoch(tmp_path / "first")


@pytest.mark.parametrize("extra, difference", [
    (["--seed", "2"], "--seed (1 in the checkpoint, 2 here)"),
    (["--val-ratio", "0.3"], "--val-ratio (0.25 in the checkpoint, 0.3 here)"),
    (["--val-batches", "fixed"], "--val-batches (reference in the checkpoint, fixed here)"),
    (["--data-ratio", "0.9", "--val-batches", "fixed"], "--data-ratio (1.0 in the checkpoint, 0.9 here)"),
    (["--batch-size", "4"], "--batch-size (6 in the checkpoint, 4 here)"),
    (["--sampler", "pk", "--samples-per-class", "3"], "--sampler (random in the checkpoint, pk here)"),
    (["--crop-size", "48"], "--crop-size (64 in the checkpoint, 48 here)"),
    (["--lr", "0.01"], "--lr (0.001 in the checkpoint, 0.01 here)"),
    (["--momentum", "0.5"], "--momentum (0.9 in the checkpoint, 0.5 here)"),
    (["--lr-step", "3"], "--lr-step (50 in the checkpoint, 3 here)"),
    (["--lr-gamma", "0.5"], "--lr-gamma (0.1 in the checkpoint, 0.5 here)"),
    (["--lr-step-at", "start"], "--lr-step-at (end in the checkpoint, start here)"),
    (["--self-pair", "exclude"], "loss option self_pair (reference in the checkpoint, exclude here)"),
])
def test_resume_refuses_other_settings_naming_each(extra: list[str], difference: str, data_root: Path,
                                                   tmp_path: Path, one_epoch_checkpoint: Path) -> None:
    out = tmp_path / "second"
    with pytest.raises(UserError) as err:
        train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                         "--epochs", 2, *QUICK, *extra, "--resume", one_epoch_checkpoint))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--resume {one_epoch_checkpoint}: this command differs")
    assert difference in message and message.endswith("(only --epochs may change)")
    assert not out.exists()


def test_resume_refuses_other_training_files_but_not_a_moved_folder(data_root: Path, tmp_path: Path,
                                                                    one_epoch_checkpoint: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(data_root / "train", moved)
    args = ("ABE_M", "ContrastiveLoss", "--output-dir", tmp_path / "first", *QUICK, "--resume", one_epoch_checkpoint)
    result = train.main(parse(*args, "--data-dir", moved, "--epochs", 2, "--seed", 1))
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    (moved / "s1" / "s1_3.png").rename(moved / "s1" / "s1_3_renamed.png")
    with pytest.raises(UserError, match=r"differs from the checkpoint's run in the training files \(18 in the "
                                        r"checkpoint, 18 here, or the same number with other names\)"):
        train.main(parse(*args, "--data-dir", moved, "--epochs", 3))
    with pytest.raises(UserError, match=r"--seed \(1 in the checkpoint, 3 here\), the training files"):
        train.main(parse(*args, "--data-dir", data_root / "train", "--epochs", 3, "--seed", 3))


def test_save_bare_state_dict_writes_the_reference_file_and_keeps_the_checkpoint(
        data_root: Path, tmp_path: Path, stub_epochs: list[int]) -> None:
    out = tmp_path / "bare"
    result = train.main(parse("se_resnet", "MsLoss", "--data-dir", data_root / "train", "--output-dir", out,
                              "--epochs", 2, *QUICK, "--save-bare-state-dict"))
    best = load(Path(result["best_checkpoint"]))
    assert all(isinstance(v, torch.Tensor) for v in best.values())
    assert keys_and_shapes(best) == layout("se_resnet50")
    assert CHECKPOINT_KEYS <= set(load(last_epoch(out)))
    for key, value in load(last_epoch(out))["model"].items():
        assert torch.equal(best[key], value), key
