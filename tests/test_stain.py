"""histo_retrieval/data/stain.py: Macenko normalisation (torchstain) with its pass-through policy and shared count, HED
stain augmentation (scikit-image) against a naive per-pixel version, and the example figure.

torchvision and scikit-image are imported inside the tests that use them: the spawned DataLoader
workers import this module, and torchvision alone takes them over a second."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from KIMIA_data import synthetic
from histo_retrieval.errors import UserError
from histo_retrieval.data.stain import (MacenkoNormalizer, StainAugment, StainDraw, draw_stain_examples, hed_jitter,
                        load_stain_target)


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


# Optical-density vectors (R, G, B) of haematoxylin and eosin: the target's are torchstain's reference
# (from a real H&E slide), the source's another lab's (bluer haematoxylin, redder eosin).
TARGET_STAINS = (unit([0.5626, 0.7201, 0.4062]), unit([0.2159, 0.8012, 0.5581]))
SOURCE_STAINS = (unit([0.65, 0.70, 0.29]), unit([0.27, 0.90, 0.35]))


def tissue_amounts(size: int = 64, tissue: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin amounts of a synthetic tissue (hepatocyte plates), made H&E-like for
    Macenko: nuclei mostly haematoxylin, the rest eosin dense enough to count as stained."""
    hema, eosin = synthetic.render_tissue(synthetic.TISSUE_CLASSES[tissue], size, size, size / 320,
                                          np.random.default_rng(seed))
    nuclei = hema > 0.3
    return np.where(nuclei, 1.5 * hema, 0.0), np.where(nuclei, 0.3 * eosin, 1.6 * eosin)


def mix(hema: np.ndarray, eosin: np.ndarray, stains, hema_gain: float = 1.0, eosin_gain: float = 1.0) -> np.ndarray:
    """Beer-Lambert: 255 exp(-(H h + E e)), uint8."""
    density = hema[..., None] * hema_gain * stains[0] + eosin[..., None] * eosin_gain * stains[1] + 0.02
    return np.clip(255.0 * np.exp(-density) + 0.5, 0, 255).astype(np.uint8)


def mean_colour(rgb: np.ndarray) -> np.ndarray:
    return rgb.reshape(-1, 3).astype(np.float64).mean(axis=0)


def stain_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The larger of the angles (degrees) between the H vectors and between the E vectors of two stain matrices."""
    cosines = (a * b).sum(axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return float(np.degrees(np.arccos(np.clip(cosines, -1, 1))).max())


@pytest.fixture(scope="module")
def pair() -> dict:
    """A target patch, and a patch of the same tissue in another stain (other vectors, H x1.3, E x0.7)."""
    hema, eosin = tissue_amounts()
    return {"target": mix(hema, eosin, TARGET_STAINS), "source": mix(hema, eosin, SOURCE_STAINS, 1.3, 0.7)}


def blank_patches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    white = np.full((32, 32, 3), 255, np.uint8)
    near_white = np.clip(235 + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
    constant = np.tile(np.array([180, 100, 160], np.uint8), (32, 32, 1))
    black = np.zeros((32, 32, 3), np.uint8)
    specks = white.copy()
    specks[0, :5] = (120, 60, 140)  # 5 stained pixels of 1024: under 1%
    hema, _ = tissue_amounts(32)
    one_stain = mix(hema, np.zeros_like(hema), TARGET_STAINS)  # haematoxylin alone
    return [white, near_white, constant, black, specks, one_stain]


# ----------------------------------------------------------------------------- normalisation
def test_normalising_brings_a_patch_to_the_target_stain(pair: dict) -> None:
    target, source = pair["target"], pair["source"]
    normalizer = MacenkoNormalizer.fit(target, "target.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalised = normalizer(source)
    assert normalised.shape == source.shape and normalised.dtype == np.uint8
    before = np.linalg.norm(mean_colour(source) - mean_colour(target))
    after = np.linalg.norm(mean_colour(normalised) - mean_colour(target))
    assert before > 30 and after < 0.2 * before  # measured: 51.4 -> 3.5
    pixel_before = np.abs(source.astype(float) - target).mean()
    pixel_after = np.abs(normalised.astype(float) - target).mean()
    assert pixel_after < 0.2 * pixel_before  # the same tissue, so pixel by pixel too: 24.9 -> 1.7
    # the stain matrix estimated on the result is the target's (measured: 14 degrees -> 0.3)
    refit = MacenkoNormalizer.fit(normalised)
    assert stain_angle(refit.stain_matrix, normalizer.stain_matrix) < 2 < 10 < stain_angle(
        MacenkoNormalizer.fit(source).stain_matrix, normalizer.stain_matrix)
    # the target normalised to itself is (almost) itself: torchstain truncates to uint8
    assert np.abs(normalizer(target).astype(int) - target).max() <= 4
    assert normalizer.passed_through == 0


def test_state_round_trips_through_json(pair: dict) -> None:
    normalizer = MacenkoNormalizer.fit(pair["target"], "lab/target.png")
    state = normalizer.state()
    assert state["method"] == "macenko" and state["target"] == "lab/target.png"
    assert np.array(state["stain_matrix"]).shape == (3, 2) and len(state["max_concentrations"]) == 2
    again = MacenkoNormalizer.from_state(json.loads(json.dumps(state)))
    assert again.state() == state
    assert np.array_equal(again(pair["source"]), normalizer(pair["source"]))
    made = MacenkoNormalizer(np.array(state["stain_matrix"]), np.array(state["max_concentrations"]), "t")
    assert np.array_equal(made(pair["source"]), normalizer(pair["source"]))


def test_blank_patches_pass_through_unchanged_and_are_counted(pair: dict) -> None:
    normalizer = MacenkoNormalizer.fit(pair["target"])
    blanks = blank_patches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchstain's numpy warnings on such patches are not let out
        for patch in blanks:
            out = normalizer(patch)
            assert out.dtype == np.uint8 and np.array_equal(out, patch)
    assert normalizer.passed_through == len(blanks)
    normalizer(pair["source"])
    assert normalizer.passed_through == len(blanks)
    normalizer.reset_count()
    assert normalizer.passed_through == 0
    # a non-contiguous view (a permuted tensor's numpy, as histo_retrieval.data.preprocessing passes) works too
    view = torch.from_numpy(pair["source"]).permute(2, 0, 1).permute(1, 2, 0).numpy()
    assert np.array_equal(normalizer(view), normalizer(pair["source"]))
    with pytest.raises(ValueError, match="uint8"):
        normalizer(pair["source"].astype(np.float32))


class Patches(Dataset):
    """Patches through a normaliser, as a DataLoader's workers would run it."""

    def __init__(self, patches: list[np.ndarray], normalizer: MacenkoNormalizer) -> None:
        self.patches, self.normalizer = patches, normalizer

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.normalizer(self.patches[index]).copy())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_the_count_adds_up_across_dataloader_workers(pair: dict, context: str) -> None:
    normalizer = MacenkoNormalizer.fit(pair["target"])
    blanks = blank_patches()
    patches = blanks + [pair["source"]] * 3
    loader = DataLoader(Patches(patches, normalizer), batch_size=None, num_workers=2,
                        multiprocessing_context=context)
    outputs = list(loader)
    assert normalizer.passed_through == len(blanks)  # counted in the workers, seen here
    for out, patch in zip(outputs[:len(blanks)], blanks):
        assert np.array_equal(out.numpy(), patch)
    assert np.array_equal(outputs[-1].numpy(), normalizer(pair["source"]))


def test_pickling_keeps_the_normaliser(pair: dict) -> None:
    normalizer = MacenkoNormalizer.fit(pair["target"], "t.png")
    normalizer(blank_patches()[0])
    copy = pickle.loads(pickle.dumps(normalizer))  # an ordinary pickle: the count travels as a number
    assert copy.state() == normalizer.state() and copy.passed_through == 1
    assert np.array_equal(copy(pair["source"]), normalizer(pair["source"]))
    copy(blank_patches()[0])
    assert copy.passed_through == 2 and normalizer.passed_through == 1


def test_what_torchstain_does_with_blank_patches() -> None:
    """The behaviour the pass-through policy is there for (torchstain's numpy backend, read in its source):
    no pixel stained -> the covariance of no pixels is NaN and the eigen-decomposition fails; a constant
    colour -> one direction only, two identical "stain" vectors, and no error."""
    import torchstain

    white, _, constant = blank_patches()[:3]
    probe = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            probe.fit(white)
            assert not np.isfinite(probe.HERef).all()  # a LAPACK that returns NaN instead of raising
        except np.linalg.LinAlgError:
            pass
        probe.fit(constant)
    assert np.allclose(probe.HERef[:, 0], probe.HERef[:, 1])


def test_a_blank_target_is_refused_by_name() -> None:
    for patch in blank_patches():
        with pytest.raises(UserError, match=r"^stain target glass\.png: its stain cannot be estimated"):
            MacenkoNormalizer.fit(patch, "glass.png")
    with pytest.raises(UserError, match="stain target"):
        MacenkoNormalizer.fit(blank_patches()[0])


def test_load_stain_target(tmp_path: Path, pair: dict) -> None:
    good = tmp_path / "target.png"
    Image.fromarray(pair["target"]).save(good)
    normalizer = load_stain_target(str(good))
    assert normalizer.target == str(good)
    assert normalizer.state() == MacenkoNormalizer.fit(pair["target"], str(good)).state()
    white = tmp_path / "white.png"
    Image.fromarray(blank_patches()[0]).save(white)
    with pytest.raises(UserError, match=rf"^--stain-target {white}: its stain cannot be estimated .*; choose"):
        load_stain_target(str(white))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for path in (broken, tmp_path / "missing.png"):
        with pytest.raises(UserError, match=rf"^--stain-target {path}: cannot read the image"):
            load_stain_target(str(path))


@pytest.mark.parametrize("change", [
    lambda s: [1, 2],
    lambda s: {**s, "method": "reinhard"},
    lambda s: {k: v for k, v in s.items() if k != "stain_matrix"},
    lambda s: {**s, "stain_matrix": s["stain_matrix"][:2]},
    lambda s: {**s, "stain_matrix": [["a", 1], [1, 1], [1, 1]]},
    lambda s: {**s, "max_concentrations": [float("nan"), 1.0]},
    lambda s: {**s, "max_concentrations": [1.0, -1.0]},
    lambda s: {**s, "stain_matrix": [[0.6, 0.6], [0.7, 0.7], [0.4, 0.4]]},  # one stain twice
    lambda s: {**s, "target": 3},
])
def test_a_malformed_state_is_refused(pair: dict, change) -> None:
    state = MacenkoNormalizer.fit(pair["target"]).state()
    with pytest.raises(UserError, match=r"^stain normalisation state: .*; fit the normaliser again"):
        MacenkoNormalizer.from_state(change(state))


# ----------------------------------------------------------------------------- augmentation
def palette_patch(palette: int, size: int = 48, tissue: int = 0) -> np.ndarray:
    hema, eosin = synthetic.render_tissue(synthetic.TISSUE_CLASSES[tissue], size, size, size / 320,
                                          np.random.default_rng(palette))
    return synthetic.colorize(hema, eosin, palette)


def test_output_is_an_rgb_image_of_the_same_size() -> None:
    image = Image.fromarray(palette_patch(0, 40)).crop((0, 0, 40, 30))
    for source in (image, image.convert("L"), image.convert("RGBA")):
        out = StainAugment()(source)
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (40, 30)


def test_no_variation_returns_the_input_exactly() -> None:
    from skimage.color import hed2rgb, rgb2hed

    still = StainAugment(0, 0, 0, 0)
    worst_round_trip = []
    for palette in range(4):
        rgb = palette_patch(palette)
        assert np.array_equal(np.asarray(still(Image.fromarray(rgb))), rgb)
        # the plain round trip: exact inside the cone of rgb2hed's H, E, DAB vectors, not outside it
        # (rgb2hed clamps negative stain amounts to 0), which hed_jitter carries over
        plain = np.rint(hed2rgb(rgb2hed(rgb)) * 255).astype(int)
        worst_round_trip.append(int(np.abs(plain - rgb).max()))
    assert worst_round_trip[0] == worst_round_trip[2] == worst_round_trip[3] == 0  # measured: 0, 42, 0, 0
    assert worst_round_trip[1] > 10


def naive_hed_jitter(rgb: np.ndarray, scale, shift) -> np.ndarray:
    """Pixel by pixel: rgb2hed, h * scale + shift per channel (the shift in optical density, rgb2hed's
    amounts being optical densities / ln(1e6)), hed2rgb, clip, round."""
    from skimage.color import hed2rgb, rgb2hed

    shift = np.asarray(shift) / np.log(1e6)
    out = np.empty_like(rgb)
    for y in range(rgb.shape[0]):
        for x in range(rgb.shape[1]):
            hed = rgb2hed(rgb[y:y + 1, x:x + 1])[0, 0]
            back = hed2rgb((hed * np.asarray(scale) + shift)[None, None])[0, 0]
            out[y, x] = np.rint(np.clip(back, 0, 1) * 255)
    return out


def test_the_shift_is_in_optical_density() -> None:
    """White glass under a haematoxylin shift of 0.1 optical density: 255 exp(-0.1 h), h rgb2hed's
    haematoxylin vector (0.65, 0.70, 0.29)."""
    white = np.full((2, 2, 3), 255, np.uint8)
    out = hed_jitter(white, (1, 1, 1), (0.1, 0, 0))
    assert out[0, 0].tolist() == np.rint(255 * np.exp(-0.1 * np.array([0.65, 0.70, 0.29]))).tolist() == [239, 238, 248]
    assert np.array_equal(hed_jitter(white, (1.2, 0.8, 1.1), (0, 0, 0)), white)  # no stain to scale


def test_hed_jitter_matches_a_naive_per_pixel_version() -> None:
    from torchvision.transforms import functional

    rgb = palette_patch(0, 16)  # inside the HED cone (see above), where the two agree by definition
    augment = StainAugment(hed_sigma=0.2, hed_bias=0.2, brightness=0, contrast=0)
    torch.manual_seed(0)
    draw = augment.draw()
    assert all(0.8 <= s <= 1.2 for s in draw.hed_scale) and all(abs(b) <= 0.2 for b in draw.hed_shift)
    assert draw.brightness == draw.contrast == 1.0
    out = np.asarray(augment.apply(Image.fromarray(rgb), draw))
    naive = naive_hed_jitter(rgb, draw.hed_scale, draw.hed_shift)
    assert np.abs(out.astype(int) - naive).max() <= 1
    assert np.abs(out.astype(int) - rgb).max() > 5  # it did vary
    # brightness and contrast are torchvision's, with the drawn factors, after the HED step
    varied = StainDraw(draw.hed_scale, draw.hed_shift, 1.08, 0.93)
    expected = functional.adjust_contrast(functional.adjust_brightness(
        Image.fromarray(hed_jitter(rgb, draw.hed_scale, draw.hed_shift)), 1.08), 0.93)
    assert np.array_equal(np.asarray(augment.apply(Image.fromarray(rgb), varied)), np.asarray(expected))


def test_draws_follow_torchs_seed() -> None:
    image = Image.fromarray(palette_patch(2))
    augment = StainAugment()
    torch.manual_seed(5)
    first = np.asarray(augment(image))
    torch.manual_seed(5)
    assert np.array_equal(np.asarray(augment(image)), first)
    torch.manual_seed(6)
    assert not np.array_equal(np.asarray(augment(image)), first)
    torch.manual_seed(5)
    draw = augment.draw()
    assert all(0.95 <= s <= 1.05 for s in draw.hed_scale) and 0.9 <= draw.brightness <= 1.1


class Augmented(Dataset):
    def __init__(self, image: Image.Image) -> None:
        self.image, self.augment = image, StainAugment()

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.augment(self.image)).copy())


def test_dataloader_workers_are_reproducible() -> None:
    dataset = Augmented(Image.fromarray(palette_patch(0, 24)))

    def run() -> list[np.ndarray]:
        loader = DataLoader(dataset, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(1))
        return [item.numpy() for item in loader]

    first = run()
    assert all(np.array_equal(a, b) for a, b in zip(first, run()))
    assert len({a.tobytes() for a in first}) == len(first)  # every item its own draw, across workers


@pytest.mark.parametrize("name, value", [("hed_sigma", 1.0), ("hed_sigma", -0.1), ("hed_bias", float("nan")),
                                         ("brightness", "0.1"), ("contrast", True), ("contrast", 2)])
def test_bad_parameters_are_refused_by_name(name: str, value) -> None:
    with pytest.raises(UserError, match=rf"^StainAugment {name}: .* is not a number in \[0, 1\)"):
        StainAugment(**{name: value})


# ----------------------------------------------------------------------------- the figure
def test_draw_stain_examples_writes_a_png(tmp_path: Path, pair: dict) -> None:
    target_file = tmp_path / "target.png"
    Image.fromarray(pair["target"]).save(target_file)
    state = torch.random.get_rng_state()
    for normalizer, name in [(None, "plain.png"), (MacenkoNormalizer.fit(pair["target"], "t"), "fitted.png"),
                             (MacenkoNormalizer.from_state(load_stain_target(str(target_file)).state()), "file.png"),
                             (MacenkoNormalizer.from_state({**MacenkoNormalizer.fit(pair["target"]).state()}),
                              "unnamed.png")]:
        draw_stain_examples(pair["source"], normalizer, str(tmp_path / name), draws=3, seed=1)
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 300 and image.height > 100
    assert torch.equal(torch.random.get_rng_state(), state)  # the figure's seed leaves the caller's RNG alone


# ----------------------------------------------------------------------------- through train.py and the tools
def test_training_with_stain_normalisation_and_augmentation_end_to_end(tmp_path: Path, capsys) -> None:
    """train.py --stain-normalize macenko --augment stain: the target's stain goes into the checkpoint,
    every tool that embeds with it normalises the same way, and a blank patch is counted, not fatal."""
    import train
    from histo_retrieval.encoders.project import load_model
    from histo_retrieval.evaluation.embedder import Embedder
    from histo_retrieval.evaluation.metrics import combine_learners

    data = tmp_path / "data"
    for number, name in enumerate(("s0", "s1")):
        (data / name).mkdir(parents=True)
        for i in range(8):
            hema, eosin = tissue_amounts(48, tissue=number, seed=i)
            Image.fromarray(mix(hema, eosin, SOURCE_STAINS, 1.3, 0.7)).save(data / name / f"{name}_{i}.png")
    Image.fromarray(np.full((48, 48, 3), 250, np.uint8)).save(data / "s0" / "s0_blank.png")  # glass
    hema, eosin = tissue_amounts(64, seed=9)
    Image.fromarray(mix(hema, eosin, TARGET_STAINS)).save(tmp_path / "target.png")
    args = train.get_args_parser().parse_args([
        "se_resnet50", "MSLoss", "--data-dir", str(data), "--output-dir", str(tmp_path / "model"), "--epochs", "1",
        "--crop-size", "32", "--batch-size", "4", "--workers", "2", "--val-ratio", "0.25", "--val-batches", "fixed",
        "--device", "cpu", "--no-attention", "--augment", "stain", "--stain-normalize", "macenko",
        "--stain-target", str(tmp_path / "target.png")])
    result = train.main(args)
    printed = capsys.readouterr().out
    assert "input preprocessing: Macenko stain normalisation to" in printed
    assert "patch(es) had no stain to estimate" in printed  # the glass patch, in the loader's workers
    assert result["last_checkpoint"] == str(tmp_path / "model" / "se_resnet50-noattention_MSLoss_checkpoint.pth")
    checkpoint = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    stain = checkpoint["preprocessing"]["stain"]
    assert stain["method"] == "macenko" and stain["target"] == str(tmp_path / "target.png")
    assert checkpoint["args"]["augment"] == "stain" and checkpoint["preprocessing"]["mean"] is None
    expected = load_stain_target(str(tmp_path / "target.png"))
    assert np.allclose(stain["stain_matrix"], expected.stain_matrix)

    loaded = load_model(result["best_checkpoint"], "cpu")
    image = data / "s1" / "s1_3.png"
    crop = np.asarray(Image.open(image).convert("RGB"))[8:40, 8:40]
    normalised = torch.from_numpy(expected(crop).copy()).permute(2, 0, 1).float().div(255)
    with torch.inference_mode():
        naive = combine_learners(loaded.model(normalised.unsqueeze(0)))
    embedded, _, _ = Embedder(loaded.model, "cpu", preprocessing=loaded.preprocessing).embed_files([str(image)], 32)
    assert torch.allclose(embedded, naive, atol=1e-5)
    blank, _, _ = Embedder(loaded.model, "cpu", preprocessing=loaded.preprocessing).embed_files(
        [str(data / "s0" / "s0_blank.png")], 32)
    assert torch.isfinite(blank).all() and loaded.preprocessing.stain_normalizer.passed_through == 1


def test_train_refuses_a_stain_normalisation_without_a_target(tmp_path: Path) -> None:
    import train

    for extra, words in ((["--stain-normalize", "macenko"], "needs --stain-target"),
                         (["--stain-target", "x.png"], "only with --stain-normalize macenko")):
        args = train.get_args_parser().parse_args(["se_resnet50", "MSLoss", "--data-dir", str(tmp_path), *extra])
        with pytest.raises(UserError, match=words):
            train.main(args)
