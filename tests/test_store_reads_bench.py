"""bench/store_reads.py: both maps read the same rows from a cold store, the advised one no more bytes,
and the table is recorded in its own section."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import store_reads
from histo_retrieval.errors import UserError


def test_a_small_run_reads_through_both_maps_and_records_them(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    rows = store_reads.main(["--rows", "20000", "--slides", "20", "--reads", "50", "--queries", "2",
                             "--work", str(tmp_path / "work"), "--record", str(out)])
    plain, advised = rows
    assert [row["map"] for row in rows] == list(store_reads.MAPS)
    assert all(row["rows"] == 50 and row["median_ms"] > 0 for row in rows)
    assert advised["read_mib"] <= plain["read_mib"]  # equal only where the disk reports no reads (tmpfs)
    assert len(list((tmp_path / "work" / "store_20000" / "vectors").glob("*.vec"))) == 1
    text = out.read_text()
    assert "## Other\n\nkept" in text and store_reads.SECTION in text
    assert "| advised MADV_RANDOM (the store's, rows far apart) |" in text and "2 reads of 50 random patch ids" in text


@pytest.mark.parametrize("argv, message", [
    (["--reads", "0"], "--reads 0: must be at least 1"),
    (["--rows", "10", "--slides", "20"], "--rows 10, --slides 20: the rows must be at least the slides"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        store_reads.main([*argv, "--no-record"])


def test_a_work_folder_in_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--work {tmp_path}: not empty"):
        store_reads.main(["--quick", "--work", str(tmp_path), "--no-record"])
    assert (tmp_path / "kept.txt").read_text() == "mine"
