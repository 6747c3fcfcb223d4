"""train.py --freeze-trunk (histo_retrieval.training.frozen) and its checkpoint as an encoder
(histo_retrieval.encoders.frozen): a projection head trained on timm's resnet18 (random weights saved
to a file) over 40 px images, which the encoder resizes to its own 224 px input."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import losses
import models
import multi_test
import train
from histo_retrieval.encoders import load_encoder
from histo_retrieval.encoders.frozen import TrunkAndHead
from histo_retrieval.encoders.weights import CheckpointError
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.evaluation.selection import VALIDATION, describe_checkpoint, select_checkpoints
from histo_retrieval.files import folder_images
from histo_retrieval.runtime import seed_everything
from histo_retrieval.training import frozen

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
HEAD_DIM = 16
# --self-pair exclude: the reference's rule keeps an anchor's own pair when x . x < 1 in float32,
# which the last bit of a vector decides (losses.base), so a rounding apart would flip it.
QUICK = ["--epochs", "2", "--batch-size", "4", "--val-ratio", "0.25", "--val-batches", "fixed", "--workers", "0",
         "--device", "cpu", "--head-dim", str(HEAD_DIM), "--self-pair", "exclude", "--seed", "1"]
IDENTITY = "resnet18-frozen-linear_MSLoss-selfpairexclude"


def resnet18_weights(path: Path, seed: int) -> Path:
    import timm

    torch.manual_seed(seed)
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), path)
    return path


class RecordedLoss(torch.nn.Module):
    """The loss train.py builds, with the value of every call (training steps and validation batches)."""

    def __init__(self, inner: torch.nn.Module, values: list[float]) -> None:
        super().__init__()
        self.inner, self.values = inner, values

    @property
    def stats(self) -> dict:
        return self.inner.stats

    def forward(self, embeddings, labels):
        loss = self.inner(embeddings, labels)
        self.values.append(loss.item())
        return loss


def run_train(argv: list, out: Path) -> dict:
    """train.main on argv, with the loss of every step and the trunk encoders it loaded."""
    values: list[float] = []
    loaded: list = []
    build_loss, load = losses.build_loss, frozen.load_encoder
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.losses, "build_loss", lambda *a, **k: RecordedLoss(build_loss(*a, **k), values))
        patch.setattr(frozen, "load_encoder", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
        result = train.main(train.get_args_parser().parse_args([str(a) for a in argv] + ["--output-dir", str(out)]))
    return {"result": result, "losses": values, "trunk": loaded[0], "out": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_images) -> dict:
    """Three runs on one data set: the cached vectors (the default), --no-feature-cache, and --augment
    reference with an MLP head (one epoch)."""
    root = tmp_path_factory.mktemp("frozen")
    make_images(root / "data" / "train", {"s0": 6, "s1": 6, "s2": 6}, size=40, seed=4)
    make_images(root / "data" / "test", {"s0": 3, "s1": 3, "s2": 3}, size=40, seed=5)
    weights = resnet18_weights(root / "resnet18.pth", seed=3)
    base = ["timm:resnet18", "MSLoss", "--freeze-trunk", "--encoder-weights", weights,
            "--data-dir", root / "data" / "train", *QUICK]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"root": root, "weights": weights, "base": base,
                "cached": run_train(base, root / "cached"),
                "uncached": run_train([*base, "--no-feature-cache"], root / "uncached"),
                "augmented": run_train([*base, "--augment", "reference", "--head", "mlp", "--epochs", "1"],
                                       root / "augmented")}
    finally:
        torch.set_num_threads(previous)


def checkpoint(folder: Path, name: str = f"{IDENTITY}_checkpoint.pth") -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def test_the_cached_vectors_give_the_losses_of_the_trunk_run_every_step(runs: dict) -> None:
    cached, uncached = runs["cached"], runs["uncached"]
    # 2 epochs x (3 training steps of 4 of the 13 training images + 2 validation batches of the 5 others).
    assert len(cached["losses"]) == len(uncached["losses"]) == 10
    assert cached["losses"] == pytest.approx(uncached["losses"], abs=1e-5)
    assert cached["losses"] != pytest.approx([cached["losses"][0]] * 10)  # the steps differ: a real comparison
    heads = [checkpoint(run["out"])["model"] for run in (cached, uncached)]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-5, rtol=0)


def test_the_trunk_is_unchanged_and_the_head_learned(runs: dict) -> None:
    fresh = load_encoder("timm:resnet18", weights=runs["weights"]).model.state_dict()
    for name in ("cached", "uncached", "augmented"):
        trunk = runs[name]["trunk"].model
        state = trunk.state_dict()
        assert state.keys() == fresh.keys()
        # Every tensor, BatchNorm running statistics included (the trunk ran in training steps).
        changed = [key for key in fresh if not torch.equal(state[key], fresh[key])]
        assert not changed, (name, changed[:3])
        assert not any(p.requires_grad for p in trunk.parameters())
    seed_everything(1)  # train.py seeds, then builds the head
    initial = models.build_head("linear", 512, HEAD_DIM).state_dict()
    trained = checkpoint(runs["cached"]["out"])["model"]
    assert trained.keys() == initial.keys() == {"layers.0.weight", "layers.0.bias"}  # the head alone
    assert not torch.allclose(trained["layers.0.weight"], initial["layers.0.weight"])


def test_the_checkpoint_records_the_trunk_and_the_run(runs: dict) -> None:
    out = runs["cached"]["out"]
    state = checkpoint(out)
    trunk = load_encoder("timm:resnet18", weights=runs["weights"])
    assert state["model_name"] == "resnet18-frozen-linear" and state["loss_name"] == "MSLoss"
    assert state["model_options"] == {"embedding_dim": HEAD_DIM, "head": "linear", "in_dim": 512,
                                      "out_dim": HEAD_DIM, "hidden": None}
    record = state["trunk"]
    assert record["spec"] == "timm:resnet18" and record["weights"] == str(runs["weights"].resolve())
    assert record["options"] is None and record["dim"] == 512
    assert record["weights_sha256"] == trunk.weights_sha256()
    assert record["input_steps"] == trunk.input_steps.to_dict() == {"crop_size": 224, "resize": 235,
                                                                     "interpolation": "bicubic"}
    assert record["preprocessing"] == state["preprocessing"] == trunk.preprocessing.to_dict()
    assert state["crop_size"] == 224 and state["args"]["augment"] == "none" and state["seed"] == 1
    assert state["class_names"] == ["s0", "s1", "s2"] and len(state["history"]) == 2
    assert state["command"] and "optimizer" in state  # the command line (here pytest's: train.main ran in it)
    assert runs["cached"]["result"]["last_checkpoint"] == str(out / f"{IDENTITY}_checkpoint.pth")
    assert (out / f"{IDENTITY}_log.csv").exists()
    # The selection reads its identity like any run's: the best-validation file is selected.
    assert describe_checkpoint(out / f"{IDENTITY}_checkpoint.pth").run == IDENTITY
    labels = select_checkpoints(sorted(out.glob("*.pth")))
    assert [Path(p).name for p, label in labels.items() if label == VALIDATION] == \
        [Path(runs["cached"]["result"]["best_checkpoint"]).name]
    augmented = checkpoint(runs["augmented"]["out"], "resnet18-frozen-mlp_MSLoss-selfpairexclude_checkpoint.pth")
    assert augmented["model_options"]["hidden"] == 512 and augmented["args"]["augment"] == "reference"


def test_the_checkpoint_embeds_as_timm_then_the_head(runs: dict) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    path = runs["cached"]["result"]["best_checkpoint"]
    encoder = load_encoder(path)
    assert (encoder.dim, encoder.crop_size, encoder.kind) == (HEAD_DIM, 224, "checkpoint")
    assert isinstance(encoder.model, TrunkAndHead) and encoder.class_names == ["s0", "s1", "s2"]
    paths = [str(p) for name in ("s0", "s1", "s2") for p in folder_images(runs["root"] / "data" / "test" / name)]
    rows, kept, failed = Embedder(encoder.model, "cpu", 4, preprocessing=encoder.preprocessing).embed_files(
        paths, encoder.input_steps)
    assert kept == list(range(len(paths))) and not failed
    # The naive way: timm's model and its own eval transform, then the head's layers on the unit vector.
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(runs["weights"], weights_only=True))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    head = models.ProjectionHead(512, HEAD_DIM)
    head.load_state_dict(torch.load(path, weights_only=True)["model"])
    with torch.no_grad():
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = F.normalize(head.layers(F.normalize(model(images), dim=1)), dim=1)
    assert rows.shape == (len(paths), HEAD_DIM)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(paths)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)


def test_a_checkpoint_whose_trunk_changed_is_refused(runs: dict, tmp_path: Path) -> None:
    state = checkpoint(runs["cached"]["out"])
    state["trunk"]["weights"] = str(resnet18_weights(tmp_path / "other.pth", seed=4))
    torch.save(state, tmp_path / "changed.pth")
    with pytest.raises(CheckpointError, match=r"^changed\.pth: its trunk timm:resnet18 from .*other\.pth no longer "
                                              r"has the weights the head was trained on .*train the head again$"):
        load_encoder(str(tmp_path / "changed.pth"))
    with pytest.raises(CheckpointError, match=r"its input steps are its trunk's .*leave --crop-size 64 out"):
        load_encoder(str(runs["cached"]["out"] / f"{IDENTITY}_checkpoint.pth"), crop_size=64)
    # --resume refuses another trunk too.
    with pytest.raises(UserError, match=r"--resume .* differs from the checkpoint's run in the frozen trunk's weights"):
        run_train([*[tmp_path / "other.pth" if a == runs["weights"] else a for a in runs["base"]], "--epochs", "3",
                   "--resume", runs["cached"]["out"] / f"{IDENTITY}_checkpoint.pth"], tmp_path / "resumed")


def test_a_resumed_head_run_continues_at_the_next_epoch(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(runs["cached"]["out"], out)
    resumed = run_train([*runs["base"], "--epochs", "3", "--resume", out / f"{IDENTITY}_checkpoint.pth"], out)
    history = resumed["result"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[:2] == checkpoint(runs["cached"]["out"])["history"]


@pytest.mark.slow
def test_multi_test_scores_a_head_like_any_checkpoint(runs: dict, tmp_path: Path) -> None:
    args = multi_test.get_args_parser().parse_args([str(runs["cached"]["out"]), "--data-dir", str(runs["root"] / "data"),
                                                    "--output-dir", str(tmp_path), "--device", "cpu", "--workers", "0",
                                                    "--batch-size", "8"])
    assert multi_test.main(args) == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["model"] for row in rows} == {"resnet18-frozen-linear"}
    assert any(row["selected_by"] == VALIDATION and row["run"] == IDENTITY for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["ABE_M", "MSLoss", "--head", "mlp"], r"^--head is for --freeze-trunk .*; add --freeze-trunk$"),
    (["ABE_M", "MSLoss", "--augment", "none"], r"^--augment none is for --freeze-trunk"),
    (["timm:resnet18", "MSLoss", "--freeze-trunk", "--pretrained", "imagenet"], r"^--pretrained is for a model trained whole"),
    (["timm:resnet18", "MSLoss", "--freeze-trunk", "--embedding-dim", "128"], r"use --head-dim$"),
    (["timm:resnet18", "MSLoss", "--freeze-trunk", "--encoder-weights", "random", "--crop-size", "64", "--device", "cpu"],
     r"^--crop-size 64: with --freeze-trunk the input steps are the encoder's \(resize to 235 px \(bicubic\), "
     r"centre crop 224 px\); leave --crop-size out$"),
    (["timm:resnet18", "MSLoss"], r"^unknown model 'timm:resnet18'; choose one of se_resnet50, resnet50, ABE_M, or add "
                                  r"--freeze-trunk to train a projection head on an encoder"),
])
def test_flags_that_do_not_apply_are_refused(argv: list, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train.main(train.get_args_parser().parse_args([*argv, "--output-dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_an_encoder_without_freeze_trunk_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "timm:vit_tiny_patch16_224", "MSLoss",
                             "--output-dir", str(tmp_path / "out")], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'timm:vit_tiny_patch16_224'")
    assert "add --freeze-trunk" in lines[0]
    assert not (tmp_path / "out").exists()
