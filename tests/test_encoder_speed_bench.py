"""bench/encoder_speed.py with tiny settings: its results file holds the rows and columns it documents
(not its timings)."""
from __future__ import annotations

import csv
import json

import pytest

from bench import encoder_speed
from histo_retrieval.errors import UserError
from histo_retrieval.files import command_line

TINY = ["--encoders", "vit_tiny", "--seconds", "0", "--batch-size", "2", "--index-encoder", "vit_tiny",
        "--index-patches", "5", "--patch-size", "40", "--index-workers", "0"]


@pytest.fixture(autouse=True)
def tiny_family(monkeypatch):
    """ViT-Ti/16 as one more family: the smallest timm ViT, so the run takes a few seconds."""
    monkeypatch.setitem(encoder_speed.FAMILIES, "vit_tiny", ("timm", "timm:vit_tiny_patch16_224"))


def test_csv_holds_model_bound_and_indexing_rows_with_the_command_and_machine(tmp_path):
    out = tmp_path / "speed.csv"
    returned = encoder_speed.main([*TINY, "--amp", "float32", "--out", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))

    assert [r["case"] for r in rows] == ["model-bound", "model-bound, as many crops", "index (embed_sources, folder)"]
    assert list(rows[0])[:len(encoder_speed.COLUMNS)] == list(encoder_speed.COLUMNS)
    assert {"command", "machine_cpu", "machine_cpu_count", "machine_torch", "setting_batch_size"} <= set(rows[0])
    for r in rows:
        assert (r["encoder"], r["dim"], r["precision"], r["batch_size"]) == ("vit_tiny", "192", "float32", "2")
        assert r["spec"] == "timm:vit_tiny_patch16_224 --encoder-weights random"
        assert r["input"] == "resize to 248 px (bicubic), centre crop 224 px"  # timm's eval transform, crop_pct 0.9
        assert r["command"] == command_line() and int(r["machine_cpu_count"]) >= 1
        assert float(r["patches_per_s"]) > 0 and float(r["seconds"]) > 0
    assert int(rows[0]["patches"]) % 2 == 0  # whole batches
    assert rows[1]["patches"] == rows[2]["patches"] == "5"  # every generated image embedded
    index = rows[2]
    assert float(index["fraction"]) == pytest.approx(
        float(index["patches_per_s"]) / float(index["model_bound_patches_per_s"]), rel=0.02)
    assert len(returned) == 3 and returned[2]["patches"] == 5


def test_json_says_bf16_is_skipped_where_the_cpu_has_no_native_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(encoder_speed, "cpu_runs_natively", lambda dtype: False)
    out = tmp_path / "speed.json"
    encoder_speed.main([*TINY, "--index-encoder", "none", "--amp", "float32", "bf16", "--out", str(out)])
    data = json.loads(out.read_text())

    assert data["command"] == command_line() and data["settings"]["batch_size"] == 2
    assert data["machine"]["bf16_native"] is False and data["machine"]["cpu_count"] >= 1
    assert [(r["case"], r["precision"]) for r in data["rows"]] == [("model-bound", "float32"), ("model-bound", "bf16")]
    skipped = data["rows"][1]
    assert skipped["patches"] == 0 and skipped["patches_per_s"] is None and skipped["note"].startswith("not native")


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        encoder_speed.main([*TINY, "--batch-size", "0"])
