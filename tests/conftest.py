"""Shared fixtures: a test that takes `device` runs on the CPU and, where one is present, on CUDA."""
from __future__ import annotations

import contextlib

import pytest
import torch

import histo_retrieval.search  # noqa: F401  before any test imports faiss: it picks faiss's BLAS kernels (search/openblas.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


# ----------------------------------------------------------------------------- evaluation and retrieval data
@pytest.fixture(scope="session")
def make_images():
    """make_images(root, {"s0": 4, ...}, size=40, seed=0): random-texture PNGs
    `root/<class>/<class>_<i>.png`, each class around its own colour (classes well apart)."""
    import numpy as np
    from PIL import Image

    def make(root, per_class: dict[str, int], size: int = 40, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        for number, name in enumerate(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            base = np.array([60 + 80 * number, 200 - 70 * number, 120], dtype=np.float64)
            for i in range(per_class[name]):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")

    return make


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_images):
    """A small Kimia-like data folder, `test/` and `train/` of classes s0, s1, s2 (32 px images are
    cropped from its 40 px ones); s2 has one test image, which has nothing of its class to find."""
    root = tmp_path_factory.mktemp("kimia")
    make_images(root / "test", {"s0": 4, "s1": 4, "s2": 1}, seed=1)  # s2: a class with one test image
    make_images(root / "train", {"s0": 2, "s1": 2, "s2": 2}, seed=2)
    return root


@pytest.fixture(scope="session")
def write_checkpoint():
    """write_checkpoint(path, model_name, crop_size=32, seed=0, val_loss=0.5, best_val_loss=None,
    epoch=0, class_names=("s0", "s1", "s2"), **model_options): a randomly initialised model saved
    by train.py's writer (histo_retrieval.evaluation.checkpoint: training_checkpoint, save_torch_file),
    so that the fixtures follow the checkpoint format wherever it goes."""
    import hashlib

    import losses
    import models
    from histo_retrieval.evaluation.checkpoint import save_torch_file, training_checkpoint

    def write(path, model_name: str, crop_size: int = 32, seed: int = 0, val_loss: float = 0.5,
              best_val_loss: float | None = None, epoch: int = 0, class_names=("s0", "s1", "s2"), **options) -> None:
        torch.manual_seed(seed)
        model = models.build_model(model_name, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50)
        run = {"model_name": models.canonical_model_name(model_name), "loss_name": "MSLoss",
               "model_options": {**models.default_model_options(model_name), **options},
               "loss_options": losses.default_loss_options("MSLoss"), "class_names": list(class_names),
               "history": [{"epoch": epoch, "val_loss": val_loss}],
               "best_val_loss": val_loss if best_val_loss is None else best_val_loss,
               "train_files": {"count": 0, "sha256": hashlib.sha256().hexdigest()}, "command": "python3 train.py"}
        args = {"model": model_name, "loss": "MSLoss", "crop_size": crop_size, "seed": seed}
        save_torch_file(training_checkpoint(model, optimizer, lr_scheduler, None, epoch, args, run), path)

    return write


# ----------------------------------------------------------------------------- the search page
@pytest.fixture(scope="session")
def served_index(tmp_path_factory, write_checkpoint, make_images) -> dict:
    """A small slide index for the search page: 3 synthetic slides (0.5 um/px, indexed at 1.0 um/px
    in 32 px patches) and a folder of patch images; {"root", "index", "checkpoint", "slides", "records"}."""
    import retrieve
    from KIMIA_data import synthetic

    root = tmp_path_factory.mktemp("served")
    records = synthetic.write_slide_set(root / "slides", count=3, classes=3, size=(1536, 1024), seed=3)
    make_images(root / "patches", {"s0": 2, "s1": 2}, size=32)
    checkpoint = root / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(checkpoint, "se_resnet50", crop_size=32, attention=False)
    slides = [str(root / "slides" / r["file"]) for r in records]
    index = root / "index"
    argv = ["index", str(checkpoint), *slides, str(root / "patches"), "--index", str(index), "--mpp", "1.0",
            "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    assert retrieve.main(retrieve.get_args_parser().parse_args(argv)) == 0
    return {"root": root, "index": index, "checkpoint": checkpoint, "slides": slides, "records": records}


@pytest.fixture(scope="module")
def service(served_index):
    """The search page's engine over `served_index`."""
    from histo_retrieval.search.service import SearchService

    opened = SearchService.open(str(served_index["index"]), "cpu", batch_size=16)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def client(service):
    """FastAPI's test client of the app over `service` (its Host, "testserver", allowed)."""
    from fastapi.testclient import TestClient

    from histo_retrieval.search.app import create_app

    with TestClient(create_app(service, allowed_hosts=["testserver"])) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live_server(served_index, tmp_path_factory) -> dict:
    """`retrieve.py serve` over `served_index` on a free loopback port, as a user starts it:
    {"url", "port", "pid"}."""
    with serving(served_index["index"], tmp_path_factory.mktemp("serve") / "serve.log") as server:
        yield server


@contextlib.contextmanager
def serving(index, log):
    """`retrieve.py serve --index INDEX` on a free loopback port, its output in `log`, until the block
    ends: {"url", "port", "pid"} (skips the test when the page's viewer is not installed)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from histo_retrieval.search.app import VIEWER_INSTALL, viewer_installed

    if not viewer_installed():
        pytest.skip(f"the page's viewer is not installed: {VIEWER_INSTALL}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(repo / "retrieve.py"), "serve", "--index",
                                    str(index), "--port", str(port), "--device", "cpu",
                                    "--batch-size", "16"], stdout=out, stderr=subprocess.STDOUT, cwd=repo)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/api/index", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"retrieve.py serve did not come up: {log.read_text()}") from None
                time.sleep(0.3)
        yield {"url": url, "port": port, "pid": process.pid}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def records_server(tmp_path_factory) -> dict:
    """`retrieve.py serve` over an index of 250 slide records (bench.page_scale.write_records: more
    than the page lists at once): {"url", "port", "pid"}."""
    from bench.page_scale import write_records

    root = tmp_path_factory.mktemp("records")
    with serving(write_records(root / "index", 250, patches=2), root / "serve.log") as server:
        yield server
