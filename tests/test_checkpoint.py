"""histo_retrieval.evaluation.checkpoint: reading any .pth (one-line errors), train.py's checkpoint dict,
models from our dicts and the reference's bare state_dicts, the weights' hash, and the run identity."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import losses
import models
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.evaluation import checkpoint
from histo_retrieval.evaluation.checkpoint import run_identity, save_torch_file, training_checkpoint
from histo_retrieval.encoders.weights import CheckpointError, read_torch_file
from histo_retrieval.encoders.project import is_training_checkpoint, load_model

DEFAULT_SE = {"embedding_dim": 512, "num_learners": 1, "attention": True}
ABLATION_SE = {**DEFAULT_SE, "attention": False}
DEFAULT_MS = {"alpha": 2.0, "beta": 5.0, "lam": 0.5, "eps": 0.2, "self_pair": "reference"}
# README's list of the checkpoint's keys, and the two the reference has no counterpart of.
CHECKPOINT_KEYS = {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "model_name", "loss_name",
                   "model_options", "loss_options", "class_names", "crop_size", "history", "val_loss", "best_val_loss",
                   "seed", "train_files", "command"} | {"preprocessing", "pretrained"}


# ----------------------------------------------------------------------------- reading and writing files
def test_atomic_save_and_nested_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "ckpt.pth"
    checkpoint.save_torch_file({"epoch": 3, "w": torch.ones(2)}, target)
    loaded = torch.load(target, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.ones(2))


def test_read_torch_file_names_a_missing_file_by_its_label(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^model/gone\.pth: no such file$"):
        read_torch_file(tmp_path / "gone.pth", label="model/gone.pth")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'gone.pth'}: no such file$"):
        read_torch_file(tmp_path / "gone.pth")
    with pytest.raises(CheckpointError, match=r"^folder: cannot be read \("):
        read_torch_file(tmp_path, label="folder")


@pytest.mark.parametrize("mmap", [False, True])
def test_read_torch_file_gives_the_saved_content_on_the_cpu(tmp_path: Path, mmap: bool) -> None:
    content = {"epoch": 2, "names": ["s0", "s1"], "w": torch.arange(6.0).reshape(2, 3)}
    save_torch_file(content, tmp_path / "c.pth")
    read = read_torch_file(tmp_path / "c.pth", mmap=mmap)
    assert read["epoch"] == 2 and read["names"] == ["s0", "s1"]
    assert torch.equal(read["w"], content["w"]) and read["w"].device.type == "cpu"


# ----------------------------------------------------------------------------- train.py's checkpoint dict
def small_run(model_name: str = "se_resnet50", val_losses: tuple[float, ...] = (0.7, 0.6)) -> dict:
    """The `run` dict train.py keeps, for a run whose validation losses were `val_losses`."""
    return {"model_name": model_name, "loss_name": "MSLoss", "model_options": dict(ABLATION_SE),
            "loss_options": dict(DEFAULT_MS), "class_names": ["s0", "s1"],
            "history": [{"epoch": e, "val_loss": v} for e, v in enumerate(val_losses)],
            "best_val_loss": min(val_losses), "train_files": {"count": 18, "sha256": "0" * 64},
            "command": "python3 train.py se_resnet50 MSLoss --no-attention"}


def test_training_checkpoint_holds_the_documented_entries_and_loads_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()  # a momentum buffer to keep
    scheduler.step()
    args = {"crop_size": 64, "seed": 3, "data_dir": Path("KIMIA_data/train"), "lr": 0.1}
    run = small_run()
    content = training_checkpoint(model, optimizer, scheduler, None, 1, args, run)
    save_torch_file(content, tmp_path / "checkpoint.pth")
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)

    assert set(saved) == CHECKPOINT_KEYS
    assert list(saved["model"]) == list(model.state_dict())  # the model's own key order: the reference's layout
    for key, value in model.state_dict().items():
        assert torch.equal(saved["model"][key], value), key
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert saved["lr_scheduler"] == scheduler.state_dict() and saved["scaler"] is None and saved["epoch"] == 1
    assert saved["args"] == {"crop_size": 64, "seed": 3, "data_dir": "KIMIA_data/train", "lr": 0.1}  # paths as text
    assert (saved["crop_size"], saved["seed"]) == (64, 3)
    assert {key: saved[key] for key in ("model_name", "loss_name", "model_options", "loss_options", "class_names",
                                        "history", "best_val_loss", "train_files", "command")} == \
        {key: run[key] for key in ("model_name", "loss_name", "model_options", "loss_options", "class_names",
                                   "history", "best_val_loss", "train_files", "command")}
    assert saved["val_loss"] == 0.6  # the last epoch's, which need not be the best
    assert saved["preprocessing"] == Preprocessing().to_dict() and saved["pretrained"] is None
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert training_checkpoint(model, optimizer, scheduler, scaler, 1, args, run)["scaler"]["scale"] == 8.0


def test_the_conftest_fixture_writes_through_the_librarys_writer(tmp_path: Path, write_checkpoint) -> None:
    write_checkpoint(tmp_path / "c.pth", "ABE_M", crop_size=48, seed=4, val_loss=0.25, epoch=3, num_learners=2,
                     embedding_dim=256)
    saved = read_torch_file(tmp_path / "c.pth")
    assert set(saved) == CHECKPOINT_KEYS and is_training_checkpoint(saved)
    assert (saved["model_name"], saved["model_options"]) == ("ABE_M", {"embedding_dim": 256, "num_learners": 2})
    assert (saved["crop_size"], saved["seed"], saved["epoch"], saved["val_loss"], saved["best_val_loss"]) == \
        (48, 4, 3, 0.25, 0.25)
    assert saved["loss_options"] == losses.default_loss_options("MSLoss")
    torch.manual_seed(4)
    for key, value in models.build_model("ABE_M", num_learners=2, embedding_dim=256).state_dict().items():
        assert torch.equal(saved["model"][key], value), key


# ----------------------------------------------------------------------------- models from files
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


def test_our_checkpoint_loads_as_the_model_it_holds(tmp_path: Path, write_checkpoint) -> None:
    path = tmp_path / "se_resnet50-noattention_MSLoss_0.5000.pth"
    write_checkpoint(path, "se_resnet50", crop_size=48, seed=7, class_names=("a", "b"), attention=False)
    loaded = load_model(path)
    assert (loaded.model_name, loaded.model_options, loaded.source) == ("se_resnet50", ABLATION_SE, "checkpoint")
    assert (loaded.crop_size, loaded.class_names, loaded.loss_name, loaded.seed) == (48, ["a", "b"], "MSLoss", 7)
    assert loaded.preprocessing == Preprocessing() and loaded.path == os.fspath(path)
    saved = read_torch_file(path)["model"]
    assert not loaded.model.training and not any(key.startswith("att_layer.") for key in saved)
    assert list(loaded.model.state_dict()) == list(saved)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert load_model(path, crop_size=64).crop_size == 64


@pytest.mark.parametrize("name, model_name, options", [
    ("ABE_M_ABELoss_0.5000.pth", "ABE_M", {"embedding_dim": 256, "num_learners": 2}),
    ("0.2_resnet50_MsLoss_0.5000.pth", "resnet50", {"embedding_dim": 192, "num_learners": 3}),
    ("se_resnet_MsLoss_0.5000.pth", "se_resnet50", {"embedding_dim": 128, "num_learners": 1, "attention": True}),
])
def test_a_bare_state_dict_gives_back_the_options_it_was_built_with(tmp_path: Path, name: str, model_name: str,
                                                                   options: dict) -> None:
    torch.manual_seed(0)
    state_dict = models.build_model(model_name, **options).state_dict()
    torch.save(state_dict, tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert (loaded.model_name, loaded.model_options) == (model_name, options)
    assert (loaded.class_names, loaded.loss_name, loaded.seed, loaded.crop_size) == (None, None, None, 224)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


# ----------------------------------------------------------------------------- the weights' hash
def naive_weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the keys in sorted order, each with its dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def test_the_weights_hash_follows_the_weights_not_the_file(tmp_path: Path, write_checkpoint) -> None:
    write_checkpoint(tmp_path / "ABE_M_MSLoss_0.5000.pth", "ABE_M", seed=1)
    ours = load_model(tmp_path / "ABE_M_MSLoss_0.5000.pth")
    torch.save(ours.model.state_dict(), tmp_path / "ABE_M_MsLoss_0.9000.pth")  # the same weights, bare
    bare = load_model(tmp_path / "ABE_M_MsLoss_0.9000.pth")
    digest = ours.weights_sha256()
    assert len(digest) == 64 and digest == bare.weights_sha256() == naive_weights_hash(ours.model.state_dict())
    write_checkpoint(tmp_path / "ABE_M_MSLoss_0.4000.pth", "ABE_M", seed=2)
    assert load_model(tmp_path / "ABE_M_MSLoss_0.4000.pth").weights_sha256() != digest
    with torch.no_grad():
        next(iter(bare.model.parameters())).view(-1)[0] += 1e-3  # one weight of millions
    assert bare.weights_sha256() != digest


# ----------------------------------------------------------------------------- run identity
def test_run_identity_tags_only_the_options_that_differ_from_their_defaults() -> None:
    assert run_identity("se_resnet50", DEFAULT_SE, "MSLoss", DEFAULT_MS) == "se_resnet50_MSLoss"
    # Missing options (an older checkpoint, or a command that does not set them) count as their defaults;
    # the names stay as spelt (the reference's files are a run of their own).
    assert run_identity("se_resnet50", {"embedding_dim": 512}, "MSLoss", None) == "se_resnet50_MSLoss"
    assert run_identity("se_resnet", {"attention": False}, "MsLoss", None) == "se_resnet-noattention_MsLoss"
    assert run_identity("se_resnet50", ABLATION_SE, "MSLoss", DEFAULT_MS) == "se_resnet50-noattention_MSLoss"
    assert run_identity("se_resnet50", {**DEFAULT_SE, "embedding_dim": 256}, "MSLoss",
                        {**DEFAULT_MS, "beta": 50.0, "self_pair": "exclude"}) == \
        "se_resnet50-embeddingdim256_MSLoss-beta50-selfpairexclude"
    assert run_identity("ABE_M", {"embedding_dim": 512, "num_learners": 2}, "ContrastiveLoss", {"margin": 0.25}) == \
        "ABE_M-numlearners2_ContrastiveLoss-margin0.25"
    assert run_identity("resnet50", {"num_learners": 4}, "ABELoss", {"lambda_div": 0.05}) == "resnet50_ABELoss"
