"""histo_retrieval.evaluation.embedder: the one eval transform batch by batch (CropCache, Embedder) gives
the embeddings of the model run on each image alone, as mean-cosine rows (metrics.combine_learners)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from histo_retrieval.data.datasets import KimiaDataset, eval_crop, eval_transform
from histo_retrieval.errors import UserError
from histo_retrieval.encoders.project import load_model
from histo_retrieval.evaluation.embedder import CropCache, Embedder

CROP = 32


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


def one_at_a_time(model: torch.nn.Module, paths: list[str], crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loop: each image alone through the reference's eval transform and the model. Gives the
    rows as the embedder lays them out (each learner's unit vector, divided by sqrt(M)) and, from the
    model's raw outputs, the mean over learners of the cosine similarities."""
    outputs = []
    with torch.no_grad():
        for path in paths:
            image = eval_transform(crop_size)(Image.open(path).convert("RGB"))
            outputs.append(model(image[None]))
    learners = [torch.cat([output[m] for output in outputs]) for m in range(len(outputs[0]))]
    rows = torch.cat([F.normalize(e, dim=1) for e in learners], dim=1) / len(learners) ** 0.5
    mean_cosine = sum(F.cosine_similarity(e[:, None], e[None], dim=2) for e in learners) / len(learners)
    return rows, mean_cosine


def test_batches_give_the_embeddings_of_each_image_alone(tmp_path: Path, make_images, write_checkpoint) -> None:
    make_images(tmp_path / "images", {"s0": 4, "s1": 3}, size=72, seed=5)
    paths = sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    write_checkpoint(tmp_path / "ABE_M_MSLoss_0.5000.pth", "ABE_M", crop_size=64, num_learners=2, embedding_dim=256)
    model = load_model(tmp_path / "ABE_M_MSLoss_0.5000.pth").model
    rows, mean_cosine = one_at_a_time(model, paths, 64)
    assert rows.shape == (7, 256)

    embedder = Embedder(model, batch_size=3)  # batches of 3 out of the cache's batches of 4: 3 + 1 + 3
    with CropCache(paths, 64, batch_size=2) as cache:
        cached = embedder.embed(cache.batches(4))
    torch.testing.assert_close(cached, rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached @ cached.T, mean_cosine, atol=1e-5, rtol=0)

    broken = tmp_path / "images" / "s0" / "s0_broken.png"
    broken.write_bytes(b"not a png")
    files, kept, failed = embedder.embed_files(paths[:2] + [str(broken)] + paths[2:], 64)
    assert kept == [0, 1, 3, 4, 5, 6, 7] and [path for path, _ in failed] == [str(broken)]
    torch.testing.assert_close(files, rows, atol=1e-5, rtol=0)


def test_bad_settings_and_nothing_to_embed_are_refused(tmp_path: Path) -> None:
    model = torch.nn.Flatten()
    with pytest.raises(UserError, match=r"^--batch-size must be at least 1, got 0$"):
        Embedder(model, batch_size=0)
    with pytest.raises(UserError, match=r"^--amp fp8: choose one of \['bf16', 'fp16', 'off'\]$"):
        Embedder(model, amp="fp8")
    with pytest.raises(UserError, match=r"^no images to embed$"):
        Embedder(model).embed([])
    broken = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in broken:
        path.write_bytes(b"not a png")
    with pytest.raises(UserError, match=rf"^none of the 2 images could be read; first failure: {broken[0]}: "):
        Embedder(model).embed_files([str(path) for path in broken], CROP)
