"""Pretrained starts (torchvision-layout ResNet-50 and GoogLeNet files, torchvision's ImageNet weights
through the torch cache), the input normalisation they bring, saved with the checkpoint and applied
by every tool that embeds with it, and the --tensorboard log."""
from __future__ import annotations

import sqlite3
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import models
import retrieve
import train
from histo_retrieval.encoders.project import load_model
from histo_retrieval.data.datasets import eval_transform
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.errors import UserError
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.training.pretrained import IMAGENET_MEAN, IMAGENET_STD, load_pretrained
from histo_retrieval.evaluation.metrics import combine_learners
from histo_retrieval.search.index import SlideIndex


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[Path, dict]:
    """A torchvision ResNet-50's state_dict, wrapped as training scripts often save it."""
    torch.manual_seed(5)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "histo_resnet50.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.backbone.{k}": v for k, v in state.items()}}, path)
    return path, state


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(6)
    state = torchvision.models.googlenet(init_weights=True, aux_logits=True).state_dict()
    path = tmp_path_factory.mktemp("weights") / "googlenet.pth"
    torch.save(state, path)
    return path, state


def torchvision_name(key: str) -> str:
    """The naive inverse of the ResNet mapping, for checking: layers0.conv1 -> conv1, layersN -> layerN."""
    return key.replace("layers0.", "").replace("layers", "layer")


@pytest.mark.parametrize("model_name", ["resnet50", "se_resnet50"])
def test_a_torchvision_resnet_file_sets_the_shared_layers(resnet_file, model_name):
    path, state = resnet_file
    model = models.build_model(model_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, model_name, str(path))
    after = model.state_dict()
    assert report.loaded and all(torch.equal(after[k], state[torchvision_name(k)]) for k in report.loaded)
    assert len(report.loaded) == len(state) - 2 and sorted(report.unused) == ["fc.bias", "fc.weight"]
    assert set(report.new) == set(after) - set(report.loaded)
    assert all(torch.equal(after[k], before[k]) for k in report.new)  # left as initialised
    new_modules = {k.split(".")[0] for k in report.new}
    assert {"att_layer", "last_linear"} <= new_modules
    if model_name == "se_resnet50":
        assert all(".se_module." in k for k in report.new if k.startswith("layers"))
    summary = report.summary()
    assert f"loaded {len(report.loaded)} tensors" in summary and "not used from the file: 2 (fc)" in summary
    assert report.normalization == (IMAGENET_MEAN, IMAGENET_STD)


def test_a_torchvision_googlenet_file_sets_abe_m_where_shapes_agree(googlenet_file):
    path, state = googlenet_file
    model = models.build_model("ABE_M")
    report = load_pretrained(model, "ABE_M", str(path))
    after = model.state_dict()
    assert torch.equal(after["prelayer.0.weight"], state["conv1.conv.weight"])
    assert torch.equal(after["prelayer.4.weight"], state["conv3.conv.weight"])
    assert torch.equal(after["e4.b2.3.weight"], state["inception4e.branch2.1.conv.weight"])
    assert torch.equal(after["b5.b4.2.running_var"], state["inception5b.branch4.1.bn.running_var"])
    # torchvision's "5x5" branch is a 3x3 convolution: left new, named in the report.
    assert "inception3a.branch3.1.conv.weight (32, 16, 3, 3) -> a3.b3.3.weight (32, 16, 5, 5)" in report.mismatched
    assert "a3.b3.3.weight" in report.new and "conv2.conv.weight" in report.unused
    assert {"att_a4", "att_e4", "att_conv_branches", "linear"} <= {k.split(".")[0] for k in report.new}
    assert not any(k.startswith("att_") for k in report.loaded)  # the attention trunk stays new
    assert report.zeroed and all(not after[k].any() for k in report.zeroed)
    # conv (bias zeroed) + BN computes what torchvision's BasicConv2d does, up to BN's epsilon.
    reference = torchvision.models.googlenet(init_weights=True, aux_logits=True)
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    model.eval(), reference.eval()
    ours = torch.relu(model.prelayer[1](model.prelayer[0](x)))
    assert torch.allclose(ours, reference.conv1(x), atol=1e-3)
    assert report.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_files_that_fit_nothing_are_refused_in_one_line(resnet_file, googlenet_file, tmp_path):
    with pytest.raises(UserError, match=r"fits nothing of ABE_M \(none of its keys is a googlenet key \(first: conv1"):
        load_pretrained(models.build_model("ABE_M"), "ABE_M", str(resnet_file[0]))
    squashed = tmp_path / "squashed.pth"
    torch.save({k: torch.zeros(1) for k in resnet_file[1]}, squashed)
    with pytest.raises(UserError, match=r"the shapes differ, first: conv1.weight \(1,\) -> layers0.conv1.weight"):
        load_pretrained(models.build_model("resnet50"), "resnet50", str(squashed))
    with pytest.raises(UserError, match="no such file"):
        load_pretrained(models.build_model("resnet50"), "resnet50", str(tmp_path / "missing.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not a state_dict"):
        load_pretrained(models.build_model("resnet50"), "resnet50", str(tmp_path / "list.pth"))


def test_imagenet_comes_from_the_torch_cache_or_says_where_to_put_it(resnet_file, tmp_path, monkeypatch):
    _, state = resnet_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError, match=r"put https://download.pytorch.org/models/resnet50-0676ba61.pth at "
                                        rf"{tmp_path / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth'}"):
        load_pretrained(models.build_model("resnet50"), "resnet50", "imagenet")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    model = models.build_model("se_resnet50")
    report = load_pretrained(model, "se_resnet50", "imagenet")
    assert report.source == "imagenet (ResNet50_Weights.IMAGENET1K_V1)" and len(report.loaded) == len(state) - 2
    assert torch.equal(model.state_dict()["layers3.5.conv2.weight"], state["layer3.5.conv2.weight"])


# ----------------------------------------------------------------------------- the normalisation, end to end
def test_the_normalisation_is_saved_and_applied_where_models_embed(resnet_file, tmp_path, make_images):
    make_images(tmp_path / "data", {"s0": 10, "s1": 10}, size=72)
    out = tmp_path / "model"
    args = train.get_args_parser().parse_args([
        "resnet50", "MSLoss", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--epochs", "1",
        "--crop-size", "64", "--batch-size", "6", "--workers", "0", "--val-ratio", "0.3", "--val-batches", "fixed",
        "--device", "cpu", "--num-learners", "2", "--pretrained", str(resnet_file[0]),
        "--tensorboard", str(tmp_path / "board")])
    result = train.main(args)
    assert result["last_checkpoint"] == str(out / "resnet50-numlearners2_MSLoss_checkpoint.pth")
    checkpoint = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["preprocessing"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "stain": None}
    assert checkpoint["pretrained"]["source"] == str(resnet_file[0]) and checkpoint["pretrained"]["loaded"] == 318

    loaded = load_model(result["best_checkpoint"], "cpu")
    assert loaded.preprocessing == Preprocessing(IMAGENET_MEAN, IMAGENET_STD)
    image = tmp_path / "data" / "s0" / "s0_0.png"
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
    crop = pixels[:, 4:68, 4:68]
    expected = (crop - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.inference_mode():
        naive = combine_learners(loaded.model(expected.unsqueeze(0)))
    embedded, _, _ = Embedder(loaded.model, "cpu", preprocessing=loaded.preprocessing).embed_files([str(image)], 64)
    assert torch.allclose(embedded, naive, atol=1e-5)
    assert torch.allclose(eval_transform(64, loaded.preprocessing)(Image.open(image).convert("RGB")), expected,
                          atol=1e-6)
    # Without the checkpoint's preprocessing the same image embeds elsewhere: the step matters.
    plain, _, _ = Embedder(loaded.model, "cpu").embed_files([str(image)], 64)
    assert not torch.allclose(plain, naive, atol=1e-3)
    # The slide search's index (and so the search page) embeds with it too.
    index = tmp_path / "index"
    argv = ["index", result["best_checkpoint"], str(tmp_path / "data"), "--index", str(index), "--device", "cpu",
            "--workers", "0"]
    assert retrieve.main(retrieve.get_args_parser().parse_args(argv)) == 0
    with sqlite3.connect(index / "patches.sqlite") as db:
        (position,) = db.execute("SELECT COUNT(*) FROM patches WHERE file < ?", (str(image),)).fetchone()
    with SlideIndex.open(index) as opened:
        (source,) = opened.sources()
        stored = opened.source_vectors(source.id)[1][position]
    assert np.allclose(stored, naive[0].numpy(), atol=1e-5)


def test_the_reference_default_normalises_nothing(make_images, tmp_path):
    assert Preprocessing.from_dict(None).is_reference and Preprocessing.from_dict({}).is_reference
    make_images(tmp_path, {"s0": 1}, size=40)
    image = Image.open(tmp_path / "s0" / "s0_0.png").convert("RGB")
    assert torch.equal(eval_transform(32)(image), eval_transform(32, Preprocessing())(image))
    assert torch.equal(eval_transform(32)(image), torchvision.transforms.functional.to_tensor(
        torchvision.transforms.functional.center_crop(image, 32)))


def test_tensorboard_logs_each_epoch_and_the_validation_embeddings(tmp_path, make_images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_images(tmp_path / "data", {"s0": 10, "s1": 10}, size=40)
    board = tmp_path / "board"
    args = train.get_args_parser().parse_args([
        "se_resnet50", "MSLoss", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "model"),
        "--epochs", "2", "--crop-size", "32", "--batch-size", "6", "--workers", "0", "--val-ratio", "0.3",
        "--val-batches", "fixed", "--device", "cpu", "--no-attention", "--tensorboard", str(board)])
    result = train.main(args)
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation", "learning_rate", "images_per_second", "skipped_batches"} <= tags
    history = result["history"]
    val = [(e.step, e.value) for e in events.Scalars("loss/validation")]
    assert val == [(h["epoch"] + 1, pytest.approx(h["val_loss"])) for h in history]
    assert [e.value for e in events.Scalars("learning_rate")] == [pytest.approx(h["lr"]) for h in history]
    projector = list(board.rglob("metadata.tsv"))
    assert len(projector) == 1 and (board / "projector_config.pbtxt").is_file()
    classes = projector[0].read_text().split()
    assert len(classes) == result["num_val_images"] and set(classes) <= {"s0", "s1"}
    vectors = np.loadtxt(projector[0].parent / "tensors.tsv", delimiter="\t")
    assert vectors.shape == (len(classes), 512)
    with Image.open(projector[0].parent / "sprite.png") as sprite:
        assert sprite.size[0] >= 48
