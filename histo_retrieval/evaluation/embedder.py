"""Images through a trained model: decoded batch by batch, embedded with bounded memory.

    encoder = load_encoder(spec, device)                                # histo_retrieval.encoders
    embedder = Embedder(encoder.model, device, batch_size=32, preprocessing=encoder.preprocessing)
    embeddings, kept, failed = embedder.embed_files(paths, encoder.input_steps)   # decode and embed in one pass

    with CropCache(paths, input_steps) as cache:                        # decode once ...
        for model in models:
            rows = Embedder(model, device).embed(cache.batches(32))      # ... embed many times

Every image goes through the encoder's input steps, `histo_retrieval.data.datasets.InputSteps` (for a
checkpoint of this project the reference's CenterCrop, as uint8), then
`histo_retrieval.data.datasets.to_unit_float` (ToTensor's division by 255) and the encoder's
preprocessing, so the embeddings of a checkpoint are those of the reference's test loader. An embedding row is `metrics.combine_learners` of the model's M outputs:
inner products of rows are the mean over learners of the cosine similarities.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from histo_retrieval.evaluation.metrics import combine_learners

from histo_retrieval.data.datasets import InputSteps, SkipUnreadable, collate_readable, to_unit_float
from histo_retrieval.errors import UserError
from histo_retrieval.images import load_rgb
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.runtime import AMP_DTYPES

DECODE_BATCH = 64  # images per decoding batch when nothing else sets it


class DecodedBatch(NamedTuple):
    images: torch.Tensor  # n x 3 x c x c uint8 crops of the readable files
    positions: list[int]  # their positions in the list of paths
    failed: list[tuple[str, str]]  # (path, reason) of the files of the batch that could not be decoded


class _EvalCrops(Dataset):
    """(uint8 crop, position, path) of each file: the items SkipUnreadable and collate_readable
    expect, with the position as the label so that a batch says which files it kept."""

    def __init__(self, paths: Sequence[str], steps: InputSteps) -> None:
        self.samples = [(os.fspath(path), position) for position, path in enumerate(paths)]
        self.crop = steps

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path, position = self.samples[index]
        return self.crop(load_rgb(path)), position, path


def decode_batches(paths: Sequence[str], steps: InputSteps | int, workers: int = 0,
                   batch_size: int = DECODE_BATCH) -> Iterator[DecodedBatch]:
    """Decode `paths` in order through the input steps (an int: the reference's centre crop of that
    size), `batch_size` files at a time; unreadable files (histo_retrieval.images.UNREADABLE) are left
    out of `images` and listed in `failed`."""
    steps = InputSteps.of(steps)
    crop_size = steps.crop_size
    dataset = _EvalCrops(paths, steps)
    loader = DataLoader(SkipUnreadable(dataset, range(len(dataset))), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_readable)
    for images, positions, failed in loader:
        yield DecodedBatch(images.view(-1, 3, crop_size, crop_size), positions.tolist(), failed)


class CropCache:
    """The uint8 crops (the input steps') of a list of images, decoded once into an unnamed temporary file and
    read back batch by batch, so that memory does not grow with the number of images.

    A file because the crops of a large gallery do not fit in memory (Kimia Path24's training set
    is about 4 GB of 224 px crops). Plain reads and not numpy.memmap because the pages of a mapped
    file count in the process's resident memory once touched: a memmap's peak RSS grows with the
    file (bench/results.md, "Measured by hand"), while read() goes through the page cache, which
    the kernel reclaims. The file has no name (deleted as soon as it is
    created, on Linux), so it disappears when the cache is closed or the process ends.
    """

    def __init__(self, paths: Sequence[str], steps: InputSteps | int, workers: int = 0,
                 directory: str | os.PathLike | None = None, batch_size: int = DECODE_BATCH) -> None:
        self.steps = InputSteps.of(steps)
        self.crop_size = self.steps.crop_size
        self.kept: list[int] = []  # positions in `paths` of the decoded images, in order
        self.failed: list[tuple[str, str]] = []
        self._file = tempfile.TemporaryFile(dir=directory, prefix="crops_")
        try:
            for batch in decode_batches(paths, self.steps, workers, batch_size):
                self._file.write(batch.images.numpy().data)
                self.kept += batch.positions
                self.failed += batch.failed
            self._file.flush()
        except BaseException:
            self.close()
            raise

    @property
    def image_bytes(self) -> int:
        return 3 * self.crop_size * self.crop_size

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def num_bytes(self) -> int:
        return len(self) * self.image_bytes

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The crops in order, as uint8 tensors of `batch_size` (the last one smaller)."""
        for start in range(0, len(self), batch_size):
            batch = torch.empty(min(batch_size, len(self) - start), 3, self.crop_size, self.crop_size,
                                dtype=torch.uint8)
            self._file.seek(start * self.image_bytes)  # per batch: two generators may take turns
            if self._file.readinto(batch.numpy().data) != batch.numel():
                raise RuntimeError(f"the crop cache file ended early at image {start}")
            yield batch

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CropCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_settings(batch_size: int, amp: str) -> None:
    """Refuse an Embedder's settings that cannot work (before any image is decoded)."""
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp}: choose one of {sorted(AMP_DTYPES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


class Embedder:
    """A model in eval mode on its device, turning batches of uint8 crops into embedding rows.

    `preprocessing` (the checkpoint's: histo_retrieval.encoders.Encoder.preprocessing) adds the stain
    normalisation and the mean and standard deviation a model was trained with; the reference has none.
    amp runs the forward pass under autocast (the rows stay float32); channels_last runs it in NHWC
    memory format: the same embeddings to float rounding, faster on CPUs and GPUs at the paper's
    224 px (slower for ResNets at small crops on CPU). The model is put in that format here.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 32, amp: str = "off",
                 channels_last: bool = False, preprocessing: Preprocessing | None = None) -> None:
        check_settings(batch_size, amp)
        self.model, self.device, self.batch_size, self.amp = model, torch.device(device), batch_size, amp
        self.preprocessing = preprocessing or Preprocessing()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)

    def embed(self, batches: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        """n x (M*d) float32 rows on the device of uint8 images (one tensor, or batches of them)."""
        parts = self._embed_parts([batches] if isinstance(batches, torch.Tensor) else batches)
        if not parts:
            raise UserError("no images to embed")
        return torch.cat(parts)

    def embed_files(self, paths: Sequence[str], steps: InputSteps | int,
                    workers: int = 0) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """Embeddings (on the CPU) of the readable files, each decoded batch embedded as it comes,
        their positions in `paths`, and (path, reason) of the unreadable ones."""
        kept: list[int] = []
        failed: list[tuple[str, str]] = []

        def readable() -> Iterator[torch.Tensor]:
            for batch in decode_batches(paths, steps, workers, self.batch_size):
                kept.extend(batch.positions)
                failed.extend(batch.failed)
                yield batch.images

        parts = [part.cpu() for part in self._embed_parts(readable())]
        if not parts:
            raise UserError(f"none of the {len(paths)} images could be read; first failure: {failed[0][0]}: "
                            f"{failed[0][1]}")
        return torch.cat(parts), kept, failed

    def _embed_parts(self, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        dtype = AMP_DTYPES[self.amp]
        parts = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                                                    enabled=dtype is not None):
            for images in batches:
                for start in range(0, images.shape[0], self.batch_size):
                    crops = self.preprocessing.normalize_stain_batch(images[start:start + self.batch_size])
                    batch = self.preprocessing.normalize(to_unit_float(crops.to(self.device, non_blocking=True)))
                    parts.append(combine_learners(self.model(batch.contiguous(memory_format=self.memory_format))))
        return parts
