"""bench/blas_kernels.py: both orders of import measured, the kernels each loaded, the table recorded."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import blas_kernels
from histo_retrieval.errors import UserError
from histo_retrieval.search.openblas import core_type_for, cpu_flags


def test_quick_measures_both_kernels_and_records_them(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    rows = blas_kernels.main(["--quick", "--queries", "500", "--lists", "50", "--vectors", "2000", "--record", str(out)])
    assert [row["order"] for row in rows] == ["OpenBLAS's own", "histo_retrieval's"]
    assert all(row["search"] > 0 and row["train"] > 0 and row["add"] > 0 for row in rows)
    chosen = core_type_for(cpu_flags())
    if chosen is not None:  # x86 with AVX2: the second process's faiss loaded the kernels chosen from the flags
        assert rows[1]["kernels"].upper() == chosen
    text = out.read_text()
    assert "## Other\n\nkept" in text and blas_kernels.SECTION in text
    assert f"| histo_retrieval's | {rows[1]['kernels']} |" in text and "Speed-up: " in text


@pytest.mark.parametrize("argv, message", [
    (["--lists", "0"], "--lists 0: must be at least 1"),
    (["--vectors", "-5"], "--vectors -5: must be at least 1"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        blas_kernels.main([*argv, "--no-record"])
