"""bench/gpu.sh and its stages (bench/gpu.py): the checks catch what they check, the timings train what
train.py trains, the table holds every stage's rows, and the reduced CPU form runs end to end."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from bench import gpu
from losses import build_loss
from models import build_model
from models.layers import StackedBatchNorm2d
from models.reference import per_head_copy

REPO = Path(__file__).resolve().parents[1]
# No GPU, whatever the machine has: the reduced form and the errors of a machine without one.
ENV_CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
namespace = argparse.Namespace


@pytest.fixture
def ieee_float32() -> Iterator[None]:
    """TF32 off on CUDA for the test, as bench/gpu.py's stacked-tail stage sets it: float32 comparisons.
    Set and restored by hand: torch answers these flags through __getattr__, which monkeypatch's undo
    takes for attributes it must delete."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- stacked tail
def test_per_head_copy_puts_the_reference_momentum_back_on_the_trunk_only() -> None:
    model = build_model("resnet50")
    reference = per_head_copy(model)
    momenta = {name: m.momentum for name, m in reference.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(momenta.values()) == {0.1}
    trunk = [m.momentum for name, m in model.named_modules() if name.startswith("att_layer.")
             and isinstance(m, nn.BatchNorm2d)]
    assert trunk == pytest.approx([1 - 0.9 ** 4] * 10)  # the model keeps its own


@pytest.mark.usefixtures("ieee_float32")
def test_stacked_tail_check_passes_the_model_and_catches_pooled_statistics(device: torch.device,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = namespace(batch_size=2, crop_size=64, seed=0)
    train_diff, stats_diff, eval_diff, ok = gpu.check_stacked_tail("resnet50", "channels_last", args, device)
    assert ok and max(train_diff, eval_diff) <= gpu.EMBEDDING_ATOL and stats_diff < 1e-3

    def pooled(name: str) -> nn.Module:
        """The tail normalising the M copies together: the bug the check is there for."""
        model = build_model(name)
        for module in model.modules():
            if isinstance(module, StackedBatchNorm2d):
                module.stacks = 1
        return model

    monkeypatch.setattr(gpu, "build_model", pooled)
    train_diff, _, _, ok = gpu.check_stacked_tail("resnet50", "contiguous", args, device)
    assert not ok and train_diff > 100 * gpu.EMBEDDING_ATOL


@pytest.mark.usefixtures("ieee_float32")
def test_stacked_batchnorm_check_passes_and_catches_one_pooled_call(device: torch.device,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    worst, ok = gpu.check_stacked_batchnorm(device, seed=0)
    assert ok and worst < 1e-3
    monkeypatch.setattr(gpu, "StackedBatchNorm2d", lambda channels, stacks: StackedBatchNorm2d(channels, stacks=1))
    worst, ok = gpu.check_stacked_batchnorm(device, seed=0)
    assert not ok and worst > 0.1


# ----------------------------------------------------------------------------- training steps
def test_bench_labels_give_every_class_a_pair_and_msloss_negatives() -> None:
    for batch in (4, 5, 60):
        labels = gpu.bench_labels(batch, torch.device("cpu")).tolist()
        counts = [labels.count(c) for c in set(labels)]
        assert len(labels) == batch and len(counts) >= 2 and min(counts) >= 2
    assert len(set(gpu.bench_labels(60, torch.device("cpu")).tolist())) == 24  # Kimia Path24's classes
    with pytest.raises(gpu.UserError, match="--batch-size must be at least 4 .* got 3"):
        gpu.bench_labels(3, torch.device("cpu"))


@pytest.mark.usefixtures("ieee_float32")
def test_timed_step_trains_se_resnet50_with_msloss_in_every_precision(device: torch.device) -> None:
    """One step from the seed's weights: its loss is MSLoss of the float32 model's embeddings, to float
    rounding in float32 and to half precision under autocast; the step figures are sane."""
    args = namespace(batch_size=4, crop_size=64, steps=1, warmup=0, seed=0)
    torch.manual_seed(0)
    model = build_model("se_resnet50").to(device).train()
    images = torch.rand(4, 3, 64, 64, device=device)
    expected = build_loss("MSLoss")(model(images), gpu.bench_labels(4, device)).item()
    assert expected > 0.1  # anchors with positives and negatives: a loss that back-propagates
    for precision, memory_format in gpu.TRAIN_CONFIGS:
        speed, peak, loss = gpu.time_training(precision, memory_format, args, device)
        tolerance = 1e-4 if precision == "float32" else 0.05
        assert loss == pytest.approx(expected, abs=tolerance), (precision, memory_format)
        assert speed > 0
        assert (peak is None) == (device.type == "cpu") and (peak is None or peak > 0)


# ----------------------------------------------------------------------------- tests stage and table
def test_junit_counts_read_pytest_results_and_the_cuda_side(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" '
                   'skipped="0"><testcase name="test_a[cpu]"/><testcase name="test_a[cuda]"/>'
                   '<testcase name="test_b[2-cuda-bf16]"/><testcase name="test_cudart"/>'
                   '<testcase name="test_c[cuda:1]"><failure/></testcase></testsuite></testsuites>')
    assert gpu.junit_counts(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 0, "cuda": 3}


def test_report_lists_every_row_and_a_stage_that_died(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = tmp_path / "rows"
    gpu.Rows(str(rows / "train.json"), "train").add("se_resnet50 float32", True, "ok: last loss 0.5", 12.5, 900.0, 3.0)
    gpu.Rows(str(rows / "tests.json"), "tests").add("pytest tests", False, "FAIL: 1 failed", seconds=9.0)
    capsys.readouterr()  # the rows as the stages printed them
    out = tmp_path / "table" / "gpu_results_cpu.md"
    ok = gpu.report_main(namespace(device="cpu", rows_dir=str(rows), out=str(out), command="bash bench/gpu.sh x",
                                   status=["stacked-tail=139", "train=0", "tests=1"]))
    assert not ok
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    lines = text.splitlines()
    assert lines[0].startswith(f"GPU bench on CPU (reduced form), torch {torch.__version__}, 20")
    assert "Command: `bash bench/gpu.sh x`" in lines and "1 of 3 rows ok." in text
    table = lines[lines.index("| stage | case | images/s | peak MiB | s | result |"):]
    # Stage order, and the crashed stage (no rows, non-zero exit) gets a row of its own.
    assert table[2:] == [
        "| stacked-tail | the stage's process | - | - | - | FAIL: exit status 139 (its log is printed above) |",
        "| train | se_resnet50 float32 | 12.5 | 900 | 3.0 | ok: last loss 0.5 |",
        "| tests | pytest tests | - | - | 9.0 | FAIL: 1 failed |"]


def test_stage_refuses_cuda_where_there_is_none_or_a_bad_size(tmp_path: Path) -> None:
    rows = str(tmp_path / "rows.json")
    bad = subprocess.run([sys.executable, "-m", "bench.gpu", "train", "--device", "cpu", "--rows", rows,
                          "--batch-size", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --batch-size must be at least 1, got 0"
    small = subprocess.run([sys.executable, "-m", "bench.gpu", "train", "--device", "cpu", "--rows", rows,
                            "--batch-size", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert small.returncode == 2 and small.stderr.strip().startswith("error: --batch-size must be at least 4 (")
    assert not Path(rows).exists()
    no_cuda = subprocess.run([sys.executable, "-m", "bench.gpu", "stacked-tail", "--device", "cuda", "--rows", rows],
                             cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV_CPU)
    assert no_cuda.returncode == 2
    assert no_cuda.stderr.strip() == ("error: --device cuda: CUDA is not available on this machine; use --device "
                                      "cpu for the reduced form")


# ----------------------------------------------------------------------------- the script
@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "error: --device tpu: expected cuda or cpu"),
    (["--stages", "train bogus"], "error: --stages: unknown stage bogus; choose among stacked-tail train ddp tests"),
    (["--budget", "5m"], "error: --budget 5m: expected a whole number of seconds"),
    (["--frobnicate"], "error: unknown argument --frobnicate; see bash bench/gpu.sh --help"),
])
def test_script_rejects_bad_arguments_in_one_line(argv: list[str], message: str) -> None:
    result = subprocess.run(["bash", "bench/gpu.sh", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == message


def test_script_refuses_cuda_without_a_gpu() -> None:
    result = subprocess.run(["bash", "bench/gpu.sh", "--device", "cuda"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=ENV_CPU)
    assert result.returncode == 2
    assert "torch sees no CUDA device here; run bash bench/gpu.sh --device cpu" in result.stderr


@pytest.mark.slow
def test_reduced_cpu_form_runs_every_stage_and_writes_the_table(tmp_path: Path) -> None:
    tests = "-k cpu tests/test_models.py::test_stacked_batchnorm_equals_one_call_per_sub_batch"
    result = subprocess.run(["bash", "bench/gpu.sh", "--device", "cpu", "--out", str(tmp_path), "--logs",
                             str(tmp_path / "logs"), "--tests", tests], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env=ENV_CPU)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (tmp_path / "gpu_results_cpu.md").read_text()
    assert text in result.stdout
    assert not (tmp_path / "gpu_results.md").exists()
    lines = text.splitlines()
    rows = lines[lines.index("| stage | case | images/s | peak MiB | s | result |") + 2:]
    stages = [row.split(" | ")[0][2:] for row in rows]
    # StackedBatchNorm2d + 2 models x 2 layouts; 4 precisions; one gloo run; one pytest run.
    assert stages == ["stacked-tail"] * 5 + ["train"] * 4 + ["ddp"] + ["tests"]
    assert all(row.split(" | ")[-1].startswith("ok") for row in rows), text
    assert "torchrun --nproc_per_node=2 train.py se_resnet50 MSLoss on cpu (gloo)" in text
    assert "ok: 4 passed (0 on CUDA), 0 failed" in text  # 2 momenta x 2 layouts of the CPU side
    train_rows = [row for row in rows if row.startswith("| train")]
    assert all(float(row.split(" | ")[2]) > 0 for row in train_rows)
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {f"{s}.log" for s in gpu.STAGES}
