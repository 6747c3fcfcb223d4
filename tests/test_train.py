"""train.py and train_traindata.py on small generated data (ABE_M / se_resnet50 at 64 px crops)."""
from __future__ import annotations

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

import train
import train_traindata
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((REPO / "tests" / "data" / "state_dict_layout.json").read_text())


def layout(model_name: str) -> list[tuple[str, list[int]]]:
    """The reference's state_dict keys and shapes, in order."""
    return [(key, shape) for key, shape in LAYOUT[model_name]["state_dict"]]


def keys_and_shapes(state_dict: dict) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in state_dict.items()]
CHECKPOINT_KEYS = {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "model_name", "loss_name",
                   "model_options", "class_names", "crop_size", "history", "val_loss", "best_val_loss", "seed", "command"}
# Small and quick: 64 px crops of 72 px images, batches of 8, no loader processes.
QUICK = ["--crop-size", "64", "--batch-size", "8", "--workers", "0", "--val-ratio", "0.25", "--device", "cpu"]
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
    return sorted(p for p in folder.glob("*.pth") if p.name != "checkpoint.pth")


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

    last = load(out / "checkpoint.pth")
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
        assert int(row["train_batches"]) == 18 // 8 and 0 <= int(row["skipped_batches"]) <= 2
    with Image.open(out / "se_resnet50_MSLoss_loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert not list(out.glob(".*.tmp"))


def uninterrupted_run(data_root: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                     "--epochs", epochs, *QUICK, *extra))
    return load(out / "checkpoint.pth")


@pytest.mark.slow
def test_killed_run_resumes_at_next_epoch_with_identical_state(data_root: Path, tmp_path: Path) -> None:
    extra = ["--lr-step", "1", "--lr-gamma", "0.5"]  # the scheduler state must survive the restart
    reference = uninterrupted_run(data_root, tmp_path / "straight", 3, extra)

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "ABE_M", "ContrastiveLoss", "--data-dir",
                                data_root / "train", "--output-dir", out, "--epochs", "50", *QUICK, *extra],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoint.pth").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = load(out / "checkpoint.pth")["epoch"]
    assert killed_at < 2

    result = train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                              "--epochs", 3, *QUICK, *extra, "--resume", out / "checkpoint.pth"))
    resumed = load(out / "checkpoint.pth")
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


@pytest.mark.slow
def test_keep_best_removes_older_best_checkpoints_of_the_run(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = train.main(parse("ABE_M", "MSLoss", "--data-dir", data_root / "train", "--output-dir", out,
                              "--epochs", "4", "--lr", "0.05", "--keep-best", "1", *QUICK))
    val_losses = [h["val_loss"] for h in result["history"]]
    improvements = sum(loss < min(val_losses[:i], default=float("inf")) for i, loss in enumerate(val_losses))
    assert improvements >= 2, "this setting must improve twice to exercise the removal"
    assert best_checkpoints(out) == [Path(result["best_checkpoint"])]
    assert load(out / "checkpoint.pth")["best_val_loss"] == pytest.approx(min(val_losses))


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
    last = load(out / "checkpoint.pth")
    assert last["epoch"] == 0 and keys_and_shapes(last["model"]) == layout("ABE_M")
    # 18 training images, 4 per process and step, 2 processes: 2 steps each.
    assert last["history"][0]["train_batches"] == 4
    assert len(read_csv(out / "ABE_M_ContrastiveLoss_log.csv")) == 1


GATHER_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from train import gather_with_grad
dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()
(y,), labels = gather_with_grad([x], torch.full((3,), rank))
weights = torch.arange(12.0).reshape(6, 2)
(y * weights).sum().backward()
assert torch.equal(y, torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10]))
assert labels.tolist() == [0, 0, 0, 1, 1, 1]
# Both processes back-propagate the same loss: each gets world_size times its rows of d loss / d y.
assert torch.equal(x.grad, 2 * weights[3 * rank: 3 * rank + 3]), x.grad
sys.stdout.write(f"ok{rank}\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gather_embeddings_gives_each_process_its_share_of_the_global_gradient(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(REPO)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok0" in result.stdout and "ok1" in result.stdout


@pytest.mark.slow
def test_train_traindata_two_ratios_write_table_and_plot(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "traindata"
    args = train_traindata.get_args_parser().parse_args(
        ["ABE_M", "ContrastiveLoss", "--ratios", "0.5", "1.0", "--data-dir", str(data_root / "train"),
         "--output-dir", str(out), "--epochs", "1", *QUICK, "--batch-size", "4"])
    rows = train_traindata.main(args)
    table = read_csv(out / "traindata_results.csv")
    assert [list(r)[:5] for r in table] == [["ratio", "images_used", "eta_p", "eta_W", "eta_total"]] * 2
    assert [float(r["ratio"]) for r in table] == [0.5, 1.0]
    assert [int(r["images_used"]) for r in table] == [12, 24]  # int(12 * r) of each of the 2 classes
    for row in table:
        eta_p, eta_w, eta_total = (float(row[k]) for k in ("eta_p", "eta_W", "eta_total"))
        assert 0 <= eta_p <= 1 and 0 <= eta_w <= 1 and eta_total == pytest.approx(eta_p * eta_w)
        assert row["protocol"] == "test" and Path(row["checkpoint"]).exists()
    assert [Path(r["checkpoint"]).parent.name for r in rows] == ["ratio_0.5", "ratio_1.0"]
    with Image.open(out / "traindata_results.png") as png:
        assert png.format == "PNG"


# ----------------------------------------------------------------------------- pieces
def test_pk_sampler_batches_hold_k_images_of_p_classes() -> None:
    labels = [0] * 7 + [1] * 5 + [2] * 6 + [3] * 9 + [4] * 1  # class 4 is too small for K = 3
    sampler = train.PKBatchSampler(labels, batch_size=9, samples_per_class=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 9
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert len(batch) == 9 and len(set(batch)) == 9
        assert sorted(classes.count(c) for c in set(classes)) == [3, 3, 3] and 4 not in classes
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches

    # Two processes share the single-process batch sequence, round-robin, without overlap.
    shards = [list(train.PKBatchSampler(labels * 2, 9, 3, num_replicas=2, rank=r, seed=5)) for r in range(2)]
    whole = list(train.PKBatchSampler(labels * 2, 9, 3, num_replicas=1, rank=0, seed=5))
    assert len(shards[0]) == len(shards[1]) == len(labels) * 2 // 18
    assert shards[0] == whole[0:2 * len(shards[0]):2] and shards[1] == whole[1:2 * len(shards[1]):2]


def test_pk_sampler_rejects_impossible_batches() -> None:
    with pytest.raises(UserError, match="multiple of --samples-per-class"):
        train.PKBatchSampler([0, 0, 1, 1], batch_size=5, samples_per_class=2)
    with pytest.raises(UserError, match=r"P <= 2 .*got P = 8 / 2 = 4"):
        train.PKBatchSampler([0, 0, 1, 1, 2], batch_size=8, samples_per_class=2)


def test_subsample_per_class_keeps_int_share_of_each_class() -> None:
    targets = [0] * 10 + [1] * 7 + [2] * 3
    kept = train.subsample_per_class(targets, 0.5, seed=1)
    assert [sum(targets[i] == c for i in kept) for c in range(3)] == [5, 3, 1]
    assert kept == train.subsample_per_class(targets, 0.5, seed=1) != train.subsample_per_class(targets, 0.5, seed=2)


def test_loss_hyper_parameters_reach_only_their_loss() -> None:
    _, loss_name, _, options = train.resolve_names(parse("abe_m", "msloss", "--ms-beta", "50", "--ms-eps", "0.1",
                                                         "--margin", "0.9"))
    assert loss_name == "MSLoss" and options == {"alpha": 2.0, "beta": 50.0, "lam": 0.5, "eps": 0.1}
    _, _, model_options, options = train.resolve_names(parse("se_resnet", "ABELoss", "--no-attention"))
    assert options == {"lambda_div": 0.05, "margin_c": 0.5, "margin_div": 0.2}
    assert model_options == {"embedding_dim": 512, "attention": False}


def test_summary_prints_the_model_without_data(capsys: pytest.CaptureFixture) -> None:
    assert train.main(parse("ABE_M", "MSLoss", "--summary", "--crop-size", "64", "--data-dir", "/nonexistent")) == {}
    text = capsys.readouterr().out
    assert "Total params: 10,534,720" in text


@pytest.mark.slow
def test_non_finite_loss_stops_before_writing_and_keeps_last_good_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build_loss = train.losses.build_loss

    class NanAfterTwoSteps(torch.nn.Module):
        """The real loss for the 2 training steps of epoch 1, NaN from then on."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.steps = inner, 0

        def forward(self, embeddings: list, labels: torch.Tensor) -> torch.Tensor:
            loss = self.inner(embeddings, labels)
            self.steps += torch.is_grad_enabled()
            return loss * float("nan") if self.steps > 2 else loss

        @property
        def stats(self) -> dict:
            return self.inner.stats

    monkeypatch.setattr(train.losses, "build_loss", lambda *a, **k: NanAfterTwoSteps(real_build_loss(*a, **k)))
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"epoch 2: the loss became non-finite .*checkpoint\.pth.*lower --lr"):
        train.main(parse("ABE_M", "ContrastiveLoss", "--data-dir", data_root / "train", "--output-dir", out,
                         "--epochs", "3", *QUICK))
    assert load(out / "checkpoint.pth")["epoch"] == 0
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
    assert [u.split(" (")[0] for u in result["unreadable"]] == [str(corrupt)]
    assert f"1 unreadable image(s) were left out:\n  {corrupt} (" in capsys.readouterr().err
    assert load(tmp_path / "out" / "checkpoint.pth")["epoch"] == 0
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
