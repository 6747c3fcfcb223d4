"""demo.py end to end in a reduced setting, and the README's two commands."""
from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3


@pytest.mark.slow
def test_demo_runs_every_step_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "demo.py", "--output", str(out), "--device", "cpu", "--classes", str(CLASSES),
               "--train-per-class", "8", "--test-per-class", "3", "--image-size", "40", "--crop-size", "32",
               "--epochs", "2", "--batch-size", "8", "--workers", "0", "--queries", "2", "--slides", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout

    # Before each step, the command for the real data set.
    for real in ("python3 KIMIA_data/data_process.py KIMIAPath24_RGB", "python3 train.py se_resnet50 MSLoss",
                 "python3 multi_test.py model/ --protocol both", "python3 retrieve.py index", "python3 retrieve.py query",
                 "python3 retrieve.py index model/<best>.pth /archive/*.svs"):
        assert f"on the real dataset:  {real}" in stdout
    # The closing figures, named as in the paper, each with its chance level.
    figures = {name: (float(value), float(chance)) for name, value, chance in
               re.findall(r"^(eta_p|eta_W|eta_total)\s+([\d.]+)\s+\(chance ([\d.]+)\)$", stdout, re.MULTILINE)}
    assert set(figures) == {"eta_p", "eta_W", "eta_total"}
    assert figures["eta_p"][1] == pytest.approx(1 / CLASSES, abs=1e-4)
    assert figures["eta_total"][0] == pytest.approx(figures["eta_p"][0] * figures["eta_W"][0], abs=1e-3)

    assert sorted(p.name for p in (out / "KIMIA_data" / "train").iterdir()) == ["s0", "s1", "s2"]
    with Image.open(next((out / "KIMIA_data" / "test" / "s0").iterdir())) as image:
        assert image.size == (40, 40)

    model_dir = out / "model"
    with open(model_dir / "se_resnet50_MSLoss_log.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    with Image.open(model_dir / "se_resnet50_MSLoss_loss.png") as image:
        assert image.format == "PNG"
    best = [p for p in model_dir.glob("se_resnet50_MSLoss_*.pth") if p.name != "se_resnet50_MSLoss_checkpoint.pth"]
    assert len(best) == 1  # the demo keeps only its best checkpoint, beside the last epoch
    assert (model_dir / "se_resnet50_MSLoss_checkpoint.pth").is_file()
    checkpoint = torch.load(best[0], map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == ["s0", "s1", "s2"] and checkpoint["crop_size"] == 32

    with open(out / "best_model" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["checkpoint"], row["protocol"]) for row in rows] == [(best[0].name, "test"), (best[0].name, "train")]
    test_row = rows[0]
    assert float(test_row["eta_p"]) == pytest.approx(figures["eta_p"][0], abs=1e-4)
    assert int(test_row["num_queries"]) == CLASSES * 3
    for protocol in ("test", "train"):
        with Image.open(out / "best_model" / "confusion" / f"{best[0].stem}_{protocol}.png") as image:
            assert image.format == "PNG"
    with Image.open(out / "best_model" / "embeddings" / f"{best[0].stem}_tsne.png") as image:
        assert image.format == "PNG"  # the t-SNE map of the test embeddings

    grids = sorted((out / "retrieval").glob("*.png"))
    assert [g.name for g in grids] == ["000_s0_test_0.png", "001_s1_test_0.png"]
    with open(out / "retrieval" / "matches.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 5

    # The slide search: a region of the first slide ranks that slide first.
    assert "python3 retrieve.py query --index slide_index/ case.svs --region" in stdout
    with open(out / "slide_search" / "slides.csv", newline="") as f:
        ranked = list(csv.DictReader(f))
    assert Path(ranked[0]["source"]).name == "slide_000.tif" and int(ranked[0]["votes"]) >= 1
    with open(out / "slide_search" / "matches.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * 5  # 2 x 2 query patches, 5 matches each
    assert (out / "slide_search" / "000_slide_000.png").is_file()


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block and text.index(block.group(0)) < 300, "the two commands must open the README"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_and_the_files_they_name_exist() -> None:
    install_and_demo, install_and_test = readme_commands()
    # Each runs in a fresh virtual environment: the system Python may refuse pip (PEP 668).
    venv = ["python3", "-m", "venv", ".venv", "&&", ".", ".venv/bin/activate", "&&"]
    install = ["pip", "install", "-r", "requirements.txt", "&&"]
    for command in (install_and_demo, install_and_test):
        words = shlex.split(command)
        assert words[:len(venv) + len(install)] == venv + install
        for word in words:
            if word.endswith((".py", ".txt")):
                assert (REPO / word).is_file(), f"README names {word}, which does not exist"
    rest = len(venv) + len(install)
    assert shlex.split(install_and_demo)[rest:] == ["python3", "demo.py"]
    # The search page's viewer comes from the npm registry, pinned by its lock file.
    assert shlex.split(install_and_test)[rest:rest + 8] == ["npm", "ci", "--prefix", "web", "&&", "python3", "-m",
                                                            "pytest"]
    assert (REPO / "web" / "package-lock.json").is_file()
    assert (REPO / "tests").is_dir()


def test_ci_runs_the_readme_test_command() -> None:
    _, install_and_test = readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert install_and_test in ci
