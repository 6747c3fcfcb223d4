"""KIMIA_data/synthetic.py --archive: a labelled archive of slides (diagnoses x patients), its
labels.csv, determinism, the patient's shared stain, replacement of an earlier archive, bad settings."""
from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histo_retrieval.errors import UserError
from histo_retrieval.search.slides import open_slide, tissue_mask
from KIMIA_data import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"diagnoses": 3, "patients": 6, "slides_per_patient": 2, "size": (1024, 768), "mpp": 1.0}
THUMB = 8  # thumbnail downsample


def write(out: Path, seed: int = 0, **overrides) -> dict:
    return synthetic.write_archive(out, **{**SETTINGS, **overrides}, seed=seed)


def labels(out: Path) -> list[dict[str, str]]:
    with open(out / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def level0(path: Path) -> np.ndarray:
    return tifffile.imread(path, key=0)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("archive") / "a"
    return out, write(out)


def test_labels_list_every_slide_once_with_its_diagnosis_and_patient(archive: tuple[Path, dict]) -> None:
    out, record = archive
    rows = labels(out)
    with open(out / "labels.csv", encoding="utf-8") as f:
        assert f.readline().strip() == "slide,label,patient"
    slides = sorted(p.name for p in out.glob("*.tiff"))
    assert len(slides) == 6 * 2  # patients x slides per patient
    assert sorted(r["slide"] for r in rows) == slides  # every slide once, nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted(["archive.json", "labels.csv", *slides])
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        patient, slide_part = Path(row["slide"]).stem.split("_")
        assert row["patient"] == patient and slide_part in ("s0", "s1")
        by_patient.setdefault(patient, set()).add(row["label"])
    assert sorted(by_patient) == [f"p{k:02d}" for k in range(6)]
    assert all(len(found) == 1 for found in by_patient.values())  # a patient has one diagnosis
    patients_per_label = {label: sum(found == {label} for found in by_patient.values())
                          for label in ("d0", "d1", "d2")}
    assert patients_per_label == {"d0": 2, "d1": 2, "d2": 2}  # dealt in turn: each diagnosis has patients
    assert [(s["file"], s["label"], s["patient"]) for s in record["slides"]] == \
        [(r["slide"], r["label"], r["patient"]) for r in rows]
    assert json.loads((out / "archive.json").read_text()) == json.loads(json.dumps(record))


def test_diagnoses_are_mixtures_sharing_classes_in_other_proportions(archive: tuple[Path, dict]) -> None:
    _, record = archive
    mixtures = record["mixtures"]
    assert all(sum(m.values()) == pytest.approx(1.0) for m in mixtures.values())
    for label, mixture in mixtures.items():  # its own class is its largest share
        assert max(mixture, key=mixture.get) == f"s{label[1:]}"
    shared = set.intersection(*(set(m) for m in mixtures.values()))
    assert shared == {"s3", "s4"}  # the shared classes follow the 3 diagnoses' own ones
    assert len({round(m["s3"], 6) for m in mixtures.values()}) == 3
    for slide in record["slides"]:  # the first piece is the diagnosis's own class, the rest from its mixture
        classes = [r["class"] for r in slide["regions"]]
        assert classes[0] == "s" + slide["label"][1:]
        assert set(classes) <= set(mixtures[slide["label"]])


def test_slides_open_have_tissue_and_vary(archive: tuple[Path, dict]) -> None:
    out, record = archive
    sizes, cover = set(), []
    for slide in record["slides"]:
        with open_slide(out / slide["file"]) as opened:
            assert opened.mpp == pytest.approx(1.0)
            assert tuple(opened.dimensions) == tuple(slide["size"])
            thumb = opened.thumbnail(THUMB)
        w, h = slide["size"]
        assert 512 <= w <= 1024 and 384 <= h <= 768 and w % 16 == 0 and h % 16 == 0
        sizes.add((w, h))
        cover.append(tissue_mask(thumb).mean())
    assert min(cover) > 0.03  # tissue on every slide
    assert len(sizes) > 6 and max(cover) > 1.5 * min(cover)  # sizes and the amount of glass vary


def _own_class_colour(out: Path, slide: dict) -> np.ndarray:
    """Mean RGB of the tissue of the slide's first piece (its diagnosis's own class) on the thumbnail."""
    with open_slide(out / slide["file"]) as opened:
        thumb = opened.thumbnail(THUMB)
    box = slide["regions"][0]
    x, y, w, h = (box[k] // THUMB for k in ("x", "y", "w", "h"))
    crop = thumb[y:y + h, x:x + w]
    return crop[tissue_mask(crop)].astype(np.float64).mean(axis=0)


def test_a_patients_slides_share_its_stain(archive: tuple[Path, dict]) -> None:
    out, record = archive
    colour = {s["file"]: _own_class_colour(out, s) for s in record["slides"]}
    same, other = [], []
    for a, b in itertools.combinations(record["slides"], 2):
        if a["label"] == b["label"]:  # the same class of tissue: only stain and scanner differ
            distance = float(np.linalg.norm(colour[a["file"]] - colour[b["file"]]))
            (same if a["patient"] == b["patient"] else other).append(distance)
    assert len(same) == 6 and len(other) == 4 * 3
    assert np.mean(same) < 0.5 * np.mean(other)
    for patient in {s["patient"] for s in record["slides"]}:
        mine = [s for s in record["slides"] if s["patient"] == patient]
        assert all(s["stain"] == mine[0]["stain"] and s["tint"] == mine[0]["tint"] for s in mine)


def test_same_seed_same_archive_other_seed_other_pixels(archive: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = archive
    write(tmp_path / "other", seed=1)
    full = tmp_path / "full"
    write(full, seed=0)
    assert (full / "labels.csv").read_bytes() == (out / "labels.csv").read_bytes()
    assert np.array_equal(level0(full / "p01_s1.tiff"), level0(out / "p01_s1.tiff"))
    mine, other = level0(out / "p01_s1.tiff"), level0(tmp_path / "other" / "p01_s1.tiff")
    assert mine.shape != other.shape or not np.array_equal(mine, other)
    assert (tmp_path / "other" / "archive.json").read_text() != (out / "archive.json").read_text()


def test_a_rerun_replaces_the_archive_and_other_folders_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "a"
    write(out, patients=4, slides_per_patient=2, diagnoses=2, size=(512, 512))
    write(out, patients=2, slides_per_patient=1, diagnoses=2, size=(512, 512))
    assert sorted(p.name for p in out.iterdir()) == ["archive.json", "labels.csv", "p00_s0.tiff", "p01_s0.tiff"]
    assert len(labels(out)) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "p00_s0.tiff").write_bytes(b"a real slide")
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="other than"):
        write(mine)
    assert (mine / "p00_s0.tiff").read_bytes() == b"a real slide"  # nothing touched


@pytest.mark.parametrize(("overrides", "message"), [
    ({"diagnoses": 1}, "--diagnoses must be from 2"),
    ({"diagnoses": synthetic.MAX_DIAGNOSES + 1}, "--diagnoses must be from 2"),
    ({"diagnoses": 4, "patients": 3}, "every diagnosis needs a patient"),
    ({"slides_per_patient": 0}, "--slides-per-patient must be at least 1"),
    ({"size": (100, 600)}, "both sides must be at least"),
])
def test_bad_settings_are_user_errors(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        write(tmp_path / "bad", **overrides)
    assert not (tmp_path / "bad").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "KIMIA_data/synthetic.py", *args], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_archive_and_refuses_bad_settings(tmp_path: Path) -> None:
    done = run_cli("--archive", str(tmp_path / "a"), "--diagnoses", "2", "--patients", "3",
                   "--slides-per-patient", "1", "--slide-size", "512x512", "--seed", "4")
    assert done.returncode == 0, done.stderr
    rows = labels(tmp_path / "a")
    assert [r["slide"] for r in rows] == ["p00_s0.tiff", "p01_s0.tiff", "p02_s0.tiff"]
    assert {r["label"] for r in rows} == {"d0", "d1"}
    record = json.loads((tmp_path / "a" / "archive.json").read_text())
    assert record["seed"] == 4 and "--archive" in record["command"] and record["mpp"] == 1.0
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.csv").write_text("mine")
    for args in (["--archive", str(tmp_path / "t"), "--diagnoses", "4", "--patients", "2"],
                 ["--archive", str(tmp_path / "t"), "--diagnoses", "1"],
                 ["--archive", str(tmp_path / "t"), "--slides-per-patient", "0"],
                 ["--archive", str(tmp_path / "t"), "--slides", str(tmp_path / "u")],
                 ["--archive", str(tmp_path / "t"), "--classes", "3"],
                 ["--archive", str(tmp_path / "x")],
                 ["--out", str(tmp_path / "p"), "--patients", "4"]):
        bad = run_cli(*args)
        assert bad.returncode == 2, args
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["data.csv"]
