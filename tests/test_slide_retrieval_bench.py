"""bench/slide_retrieval.py: the synthetic archive, the three encoders, the table of slide_retrieval.csv's columns."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import slide_retrieval

REPO = Path(__file__).resolve().parents[1]


def test_markdown_table_has_the_main_columns_and_one_line_per_row() -> None:
    row = {"method": "trained", "tiling": "full", "slide_score": "votes", "exclude": "patient", "top1_acc": "0.75",
           "mv5_acc": "0.5",
           "mmv5": "0.25", "map5_sish": "0.4", "map5_hits": "0.6", "query_ms_median": "1.26",
           "query_patches_per_slide": "12.4", "index_patches_per_slide": "12.4", "index_bytes_per_slide": "4096"}
    lines = slide_retrieval.markdown_table([row]).splitlines()
    assert lines[0] == "| method | tiling | slide_score | exclude | " + " | ".join(slide_retrieval.MAIN_COLUMNS) + " |"
    assert lines[2] == "| trained | full | votes | patient | 0.750 | 0.500 | 0.250 | 0.400 | 0.600 | 1.3 | 12 | 12 | 4096 |"
    assert len(lines) == 3


@pytest.mark.slow
def test_quick_run_writes_a_row_per_method_tiling_score_and_exclusion(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "bench.slide_retrieval", "--quick", "--out-dir", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "slide_retrieval_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tilings = ["full", "mosaic"] if slide_retrieval.mosaic_available() else ["full"]
    scores = ["votes", "median-of-best"]  # the default --slide-scores
    assert [(r["method"], r["tiling"], r["slide_score"], r["exclude"]) for r in rows] == [
        (m, t, s, e) for m in slide_retrieval.METHODS for t in tilings for s in scores
        for e in slide_retrieval.EXCLUSIONS]
    assert set(slide_retrieval.MAIN_COLUMNS) <= set(rows[0])
    # each row is retrieve.py evaluate's own row for that index, unchanged
    for method in slide_retrieval.METHODS:
        for tiling in tilings:
            for score in scores:
                name = f"{method.replace(' ', '_')}_{tiling}" + ("" if score == "votes" else f"_{score}")
                with open(out / "evaluations" / name / "slide_retrieval.csv", newline="") as f:
                    own = list(csv.DictReader(f))
                assert [{k: v for k, v in r.items() if k not in ("method", "tiling")} for r in rows
                        if r["method"] == method and r["tiling"] == tiling and r["slide_score"] == score] == own
    # every labelled slide of the quick archive (2 diagnoses x 4 patients x 2 slides) is a query
    assert {r["queries"] for r in rows} == {"8"}
    # the three encoders tile the slides alike: the same patches per slide in every full index
    assert len({r["index_patches_per_slide"] for r in rows if r["tiling"] == "full"}) == 1
    settings = json.loads((out / "slide_retrieval_settings.json").read_text())
    python = os.path.basename(sys.executable)
    assert settings["command"] == f"{python} -m bench.slide_retrieval --quick --out-dir {out}"
    assert settings["seed"] == 0 and settings["slides"] == 8 and settings["tilings"] == tilings
    assert Path(settings["trained_checkpoint"]).is_file() and Path(settings["untrained_checkpoint"]).is_file()
    markdown = (out / "slide_retrieval_results.md").read_text()
    assert f"Command: `{settings['command']}`" in markdown
    assert markdown.count("\n| colour histogram |") == len(tilings) * len(scores) * 2
    assert "on the synthetic patch set's 4 tissue classes" in markdown
