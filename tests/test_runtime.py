"""histo_retrieval.runtime: seeding, the device, and the --amp checks."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from histo_retrieval import errors, runtime


def test_seed_and_device() -> None:
    runtime.seed_everything(5)
    first = (torch.rand(3), np.random.rand(), random.random())
    runtime.seed_everything(5)
    second = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    assert runtime.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.select_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(errors.UserError, match="CUDA is not available"):
            runtime.select_device("cuda")


def test_amp_on_a_cpu_without_native_instructions_is_refused_unless_forced(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cpu_runs_natively", lambda dtype: False)
    with pytest.raises(errors.UserError, match=r"^--amp bf16: this CPU \(.*\) has no bfloat16 .* instructions, so it is "
                                               r"emulated: .*7x slower.*; use --amp off, or add --amp-force"):
        runtime.check_amp("bf16", torch.device("cpu"))
    runtime.check_amp("bf16", torch.device("cpu"), force=True)
    runtime.check_amp("off", torch.device("cpu"))
    monkeypatch.setattr(runtime, "cpu_runs_natively", lambda dtype: True)
    runtime.check_amp("bf16", torch.device("cpu"))
    with pytest.raises(errors.UserError, match="--amp fp16 needs CUDA to train"):
        runtime.check_amp("fp16", torch.device("cpu"), force=True)


def test_cpu_query_answers_for_both_half_types() -> None:
    assert isinstance(runtime.cpu_runs_natively(torch.bfloat16), bool)
    assert isinstance(runtime.cpu_runs_natively(torch.float16), bool)
