"""histo_retrieval.encoders: every kind of spec gives the vectors the field's own code gives.

timm encoders against a plain timm forward after timm's own eval transform; presets against the
settings their model cards state (written out here, not read from the code under test); the colour
histogram against a naive joint histogram; weights files found where the docs say and refused with
one line when they do not fit. Tiny models only (vit_tiny, resnet18, presets at reduced width).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.encoders import add_encoder_args, load_encoder
from histo_retrieval.encoders.presets import PRESETS
from histo_retrieval.encoders.project import load_model
from histo_retrieval.encoders.timm_encoders import create_timm_model
from histo_retrieval.encoders.weights import CheckpointError, tensors_sha256
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.embedder import Embedder

# Reduced width for building the presets in a test: their real sizes (ViT-L to ViT-g) take minutes and GBs.
SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timm_model(architecture: str, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(architecture, pretrained=False, num_classes=0).eval()


def save_weights(state_dict: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """RGB images of several sizes: square, landscape, portrait, and smaller than a 224 crop."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (width, height) in enumerate([(224, 224), (300, 200), (180, 260), (120, 90), (257, 511)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"image_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


# ----------------------------------------------------------------------------- timm: timm's own transform
@pytest.mark.parametrize("architecture, suffix", [("vit_tiny_patch16_224", ".pth"),
                                                  ("resnet18", ".safetensors"),
                                                  ("vit_tiny_patch16_224", ".bin")])
def test_timm_encoder_equals_timm_forward_after_timms_eval_transform(tmp_path, image_files, architecture, suffix):
    import timm.data

    model = timm_model(architecture, seed=1)
    path = save_weights(model.state_dict(), tmp_path / f"weights{suffix}")
    encoder = load_encoder(f"timm:{architecture}", weights=str(path))

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model(torch.stack([transform(Image.open(p).convert("RGB")) for p in image_files])), dim=1)
    embedder = Embedder(encoder.model, "cpu", batch_size=2, preprocessing=encoder.preprocessing)
    vectors, kept, failed = embedder.embed_files([str(p) for p in image_files], encoder.input_steps)

    assert kept == list(range(len(image_files))) and not failed
    assert vectors.shape == (len(image_files), encoder.dim)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=0)
    assert encoder.kind == "timm" and encoder.path == str(path.resolve())
    assert encoder.weights_sha256() == tensors_sha256(model.state_dict())


def test_timm_random_weights_are_seeded_and_differ_from_a_file(tmp_path):
    first = load_encoder("timm:vit_tiny_patch16_224", weights="random")
    again = load_encoder("timm:vit_tiny_patch16_224", weights="random")
    assert first.path == "random" and first.weights_sha256() == again.weights_sha256()
    path = save_weights(timm_model("vit_tiny_patch16_224", seed=1).state_dict(), tmp_path / "w.pth")
    assert load_encoder("timm:vit_tiny_patch16_224", weights=str(path)).weights_sha256() != first.weights_sha256()


def test_timm_without_weights_says_how_to_give_them():
    with pytest.raises(UserError, match=r"timm:vit_tiny_patch16_224: pass its weights with --encoder-weights"):
        load_encoder("timm:vit_tiny_patch16_224")


# ----------------------------------------------------------------------------- presets: the model cards' settings
# Each preset as its model card (and the config.json timm reads from its page) states it.
MODEL_CARDS = {
    # https://huggingface.co/MahmoodLab/UNI: timm vit_large_patch16_224, init_values 1e-5, Resize(224), ImageNet
    "uni": dict(architecture="vit_large_patch16_224", steps=InputSteps(224, 224, "bilinear"), norm=IMAGENET,
                mpp=0.5, pooling="pooled", patch=16, prefix_tokens=1, swiglu=False, dim=1024),
    # https://huggingface.co/MahmoodLab/UNI2-h: vit_giant_patch14_224 with depth 24, 24 heads, 1536 wide, SwiGLU,
    # 8 register tokens, no_embed_class
    "uni2-h": dict(architecture="vit_giant_patch14_224", steps=InputSteps(224, 224, "bicubic"), norm=IMAGENET,
                   mpp=0.5, pooling="pooled", patch=14, prefix_tokens=9, swiglu=True, dim=1536),
    # https://huggingface.co/paige-ai/Virchow: ViT-H/14, SwiGLU; class token + mean of the 256 patch tokens
    "virchow": dict(architecture="vit_huge_patch14_224", steps=InputSteps(224, 224, "bicubic"), norm=IMAGENET,
                    mpp=0.5, pooling="class+patch-mean", patch=14, prefix_tokens=1, swiglu=True, dim=2560),
    # https://huggingface.co/paige-ai/Virchow2: as Virchow with 4 register tokens (output[:, 5:] are the patches)
    "virchow2": dict(architecture="vit_huge_patch14_224", steps=InputSteps(224, 224, "bicubic"), norm=IMAGENET,
                     mpp=0.5, pooling="class+patch-mean", patch=14, prefix_tokens=5, swiglu=True, dim=2560),
    # https://huggingface.co/bioptimus/H-optimus-0: vit_giant_patch14_reg4_dinov2, 224 px at 0.5 um/px, its own
    # mean and std, no resize (ToTensor, Normalize)
    "h-optimus-0": dict(architecture="vit_giant_patch14_reg4_dinov2", steps=InputSteps(224),
                        norm=((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)), mpp=0.5,
                        pooling="pooled", patch=14, prefix_tokens=5, swiglu=True, dim=1536),
    # https://huggingface.co/prov-gigapath/prov-gigapath: Resize(256, bicubic), CenterCrop(224), ImageNet;
    # ViT-g with 16 px patches
    "prov-gigapath": dict(architecture="vit_giant_patch14_dinov2", steps=InputSteps(224, 256, "bicubic"),
                          norm=IMAGENET, mpp=0.5, pooling="pooled", patch=16, prefix_tokens=1, swiglu=True, dim=1536),
}


def test_every_preset_is_checked_here():
    assert sorted(PRESETS) == sorted(MODEL_CARDS)


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_preset_builds_with_its_model_cards_settings(name):
    from timm.layers import GluMlp  # SwiGLUPacked is GluMlp with SiLU, packed

    card = MODEL_CARDS[name]
    encoder = load_encoder(name, weights="random", options=SMALL)
    vit = getattr(encoder.model, "vit", encoder.model)

    assert (encoder.kind, encoder.model_name, encoder.input_steps) == ("preset", card["architecture"], card["steps"])
    assert (encoder.preprocessing.mean, encoder.preprocessing.std) == card["norm"]
    assert encoder.mpp == card["mpp"] and encoder.pooling == card["pooling"]
    assert vit.patch_embed.patch_size == (card["patch"], card["patch"])
    assert vit.num_prefix_tokens == card["prefix_tokens"]
    assert isinstance(vit.blocks[0].mlp, GluMlp) == card["swiglu"]
    if card["swiglu"]:
        assert isinstance(vit.blocks[0].mlp.act, torch.nn.SiLU)
    assert hasattr(vit.blocks[0].ls1, "gamma")  # init_values: LayerScale, whose weights the checkpoints hold
    # The full-width vector size: the card's width, doubled for the class token + patch mean.
    assert PRESETS[name].options.get("embed_dim", _default_width(card["architecture"])) * (
        2 if card["pooling"] == "class+patch-mean" else 1) == card["dim"]
    # At reduced width the vector is what a forward pass gives.
    with torch.no_grad():
        out = encoder.model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, encoder.dim) == (2, SMALL["embed_dim"] * (2 if card["pooling"] == "class+patch-mean" else 1))
    assert PRESETS[name].page.startswith("https://huggingface.co/") and PRESETS[name].licence


def _default_width(architecture: str) -> int:
    return create_timm_model(architecture, {"depth": 1, "img_size": 28}).embed_dim


def test_virchow2_vector_is_class_token_beside_the_mean_of_patch_tokens_after_the_registers():
    encoder = load_encoder("virchow2", weights="random", options=SMALL)
    images = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder.model.vit.forward_features(images)
        vectors = encoder.model(images)
    assert tokens.shape[1] == 1 + 4 + (224 // 14) ** 2
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
    torch.testing.assert_close(vectors, expected)
    # Through the Embedder: that vector, L2-normalised, from uint8 crops and the ImageNet mean and std.
    crops = (images * 255).round().to(torch.uint8)
    embedded = Embedder(encoder.model, "cpu", preprocessing=encoder.preprocessing).embed(crops)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        tokens = encoder.model.vit.forward_features((crops.float() / 255 - mean) / std)
    manual = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
    torch.testing.assert_close(embedded, torch.nn.functional.normalize(manual, dim=1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- where preset weights are found
@pytest.fixture
def empty_weight_places(tmp_path, monkeypatch) -> dict[str, Path]:
    """HISTO_RETRIEVAL_WEIGHTS and the Hugging Face cache pointed at empty folders (huggingface_hub reads its
    cache folder when imported, so its constant is pointed there too)."""
    import huggingface_hub.constants

    places = {"weights": tmp_path / "weights", "hf_home": tmp_path / "hf", "hub": tmp_path / "hf" / "hub"}
    for folder in places.values():
        folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HISTO_RETRIEVAL_WEIGHTS", str(places["weights"]))
    monkeypatch.setenv("HF_HOME", str(places["hf_home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(places["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(places["hub"]))
    return places


def small_preset_weights(name: str, seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_timm_model(PRESETS[name].architecture, {**PRESETS[name].options, **SMALL}).state_dict()


@pytest.mark.parametrize("name", ["uni", "virchow2"])
def test_missing_preset_weights_name_the_page_and_the_path(empty_weight_places, name):
    with pytest.raises(UserError) as caught:
        load_encoder(name, options=SMALL)
    message = str(caught.value)
    expected_path = empty_weight_places["weights"] / name / "pytorch_model.bin"
    assert "\n" not in message
    assert PRESETS[name].page in message and str(expected_path) in message and "--encoder-weights" in message


def test_preset_weights_at_the_documented_local_path_are_found(empty_weight_places):
    state_dict = small_preset_weights("uni")
    path = save_weights(state_dict, empty_weight_places["weights"] / "uni" / "pytorch_model.bin")
    encoder = load_encoder("uni", options=SMALL)
    assert encoder.path == str(path) and encoder.weights_sha256() == tensors_sha256(state_dict)


def test_preset_weights_in_the_hugging_face_cache_are_found_without_network(empty_weight_places):
    state_dict = small_preset_weights("h-optimus-0")
    repo = empty_weight_places["hub"] / "models--bioptimus--H-optimus-0"
    revision = "0123456789abcdef0123456789abcdef01234567"
    path = save_weights(state_dict, repo / "snapshots" / revision / "pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    encoder = load_encoder("h-optimus-0", options=SMALL)
    assert encoder.path == str(path) and encoder.weights_sha256() == tensors_sha256(state_dict)


def test_given_weights_win_over_the_local_folder(empty_weight_places, tmp_path):
    save_weights(small_preset_weights("uni", seed=5), empty_weight_places["weights"] / "uni" / "pytorch_model.bin")
    given = small_preset_weights("uni", seed=6)
    path = save_weights(given, tmp_path / "mine.safetensors")
    assert load_encoder("uni", weights=str(path), options=SMALL).weights_sha256() == tensors_sha256(given)


# ----------------------------------------------------------------------------- files and specs refused in one line
def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_weights_of_another_architecture_are_refused_naming_the_file_and_first_mismatch(tmp_path):
    path = save_weights(timm_model("resnet18", seed=0).state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError) as caught:
        load_encoder("timm:vit_tiny_patch16_224", weights=str(path))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "missing keys (cls_token, pos_embed, patch_embed.proj.weight, ...)" in message
    assert "120 unexpected keys (bn1.num_batches_tracked" in message  # safetensors keeps keys sorted

    wider = save_weights(timm_model("vit_small_patch16_224", seed=0).state_dict(), tmp_path / "vit_s.pth")
    message = one_line_error(lambda: load_encoder("timm:vit_tiny_patch16_224", weights=str(wider)))
    assert message.startswith(str(wider)) and "wrong shapes (cls_token (1, 1, 384) vs (1, 1, 192)" in message


def test_a_damaged_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    message = one_line_error(lambda: load_encoder("timm:vit_tiny_patch16_224", weights=str(path)))
    assert message.startswith(f"{path}: a damaged safetensors file")


def test_a_pth_that_holds_no_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2), 3], path)
    message = one_line_error(lambda: load_encoder("timm:vit_tiny_patch16_224", weights=str(path)))
    assert message == f"{path}: holds no state_dict (a dict of tensor names to tensors)"


def test_a_missing_weights_file_is_refused(tmp_path):
    path = tmp_path / "nowhere.bin"
    assert one_line_error(lambda: load_encoder("timm:resnet18", weights=str(path))) == f"{path}: no such file"


@pytest.mark.parametrize("spec, close", [("timm:vit_tiny_patch16_22", "vit_tiny_patch16_224"),
                                         ("virchow3", "virchow2"), ("uni2", "uni2-h"), ("histogramm", "histogram")])
def test_an_unknown_architecture_or_preset_names_the_close_matches(spec, close):
    weights = "random" if spec.startswith("timm:") else None
    message = one_line_error(lambda: load_encoder(spec, weights=weights))
    assert "did you mean" in message and close in message


@pytest.mark.parametrize("text, says", [("[1, 2]", "expected a JSON object"), ("{bins: 8}", "not JSON"),
                                        ("8", "expected a JSON object")])
def test_encoder_options_that_are_not_a_json_object_are_refused_by_argparse(capsys, text, says):
    parser = argparse.ArgumentParser(prog="tool")
    add_encoder_args(parser)
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--encoder", "histogram", "--encoder-options", text])
    assert caught.value.code == 2
    assert f"argument --encoder-options: {says}" in capsys.readouterr().err
    assert parser.parse_args(["--encoder-options", '{"bins": 4}']).encoder_options == {"bins": 4}


# ----------------------------------------------------------------------------- the colour histogram
def naive_joint_histogram(crop: np.ndarray, bins: int) -> np.ndarray:
    """crop: 3 x H x W uint8. Counted pixel by pixel, L1 then L2 normalised."""
    counts = np.zeros((bins, bins, bins))
    for y in range(crop.shape[1]):
        for x in range(crop.shape[2]):
            r, g, b = (int(crop[c, y, x]) * bins // 256 for c in range(3))
            counts[r, g, b] += 1
    vector = counts.reshape(-1) / counts.sum()
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("bins", [8, 4])
def test_histogram_encoder_equals_a_naive_joint_histogram(image_files, bins):
    encoder = load_encoder("histogram", options={"bins": bins, "crop_size": 48})
    crops = torch.stack([encoder.input_steps(Image.open(p).convert("RGB")) for p in image_files])
    vectors = Embedder(encoder.model, "cpu", preprocessing=encoder.preprocessing).embed(crops)
    expected = np.stack([naive_joint_histogram(crop.numpy(), bins) for crop in crops])
    assert encoder.dim == bins ** 3 and vectors.shape == (len(image_files), bins ** 3)
    np.testing.assert_allclose(vectors.numpy(), expected, atol=1e-6)


def test_histogram_identity_follows_its_bins_and_is_stable():
    eight, sixteen = load_encoder("histogram"), load_encoder("histogram", options={"bins": 16})
    assert eight.model_options["bins"] == 8 and eight.weights_sha256() == load_encoder("histogram").weights_sha256()
    assert eight.weights_sha256() != sixteen.weights_sha256()
    assert eight.weights_sha256() == eight.weights_sha256()


def test_histogram_refuses_weights_and_unknown_options():
    assert "no weights" in one_line_error(lambda: load_encoder("histogram", weights="x.pth"))
    assert "bins and crop_size only" in one_line_error(lambda: load_encoder("histogram", options={"depth": 1}))


# ----------------------------------------------------------------------------- checkpoints: as before
def test_a_checkpoint_spec_loads_exactly_as_load_model(tmp_path, write_checkpoint):
    path = tmp_path / "se_resnet50_MSLoss_0.5.pth"
    write_checkpoint(path, "se_resnet50", crop_size=32, seed=2)
    through_registry, direct = load_encoder(str(path)), load_model(str(path))
    crops = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vectors = [Embedder(e.model, "cpu", preprocessing=e.preprocessing).embed(crops) for e in (through_registry, direct)]
    torch.testing.assert_close(vectors[0], vectors[1], atol=0, rtol=0)
    assert through_registry.weights_sha256() == direct.weights_sha256()
    assert (through_registry.kind, through_registry.input_steps, through_registry.dim) == \
        ("checkpoint", InputSteps(32), direct.dim)
    assert one_line_error(lambda: load_encoder(str(path), weights="random")).startswith(f"--encoder {path}")
