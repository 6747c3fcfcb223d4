"""bench/serve.py (python3 -m bench.serve): a tiny load test of `retrieve.py serve` runs end to end, with no failed request."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from histo_retrieval.search.app import viewer_installed

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_bench_answers_every_search_and_records_its_table(tmp_path: Path) -> None:
    if not viewer_installed():
        pytest.skip("the page's viewer is not installed (npm ci --prefix web): retrieve.py serve refuses to start")
    out, record = tmp_path / "out", tmp_path / "results.md"
    record.write_text("# Results\n\n## Search page under load (bench/serve.py)\n\nan older run\n\n"
                      "## Other bench\n\nkept\n")
    command = [sys.executable, "-m", "bench.serve", "--patches", "2000", "--clients", "2",
               "--requests", "8", "--crop-size", "32", "--slides", "1", "--slide-size", "1024x1024",
               "--breakdown-repeats", "2", "--work", str(tmp_path / "work"), "--out", str(out),
               "--record", str(record)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads((out / "serve.json").read_text())
    assert data["requests"] == 8 and data["ok"] == 8 and data["errors"] == 0
    assert data["patches"] == 2000 and data["sources"] == 2 and data["clients"] == 2
    assert data["rps"] > 0 and 0 < data["median_ms"] <= data["p95_ms"] <= data["max_ms"]
    assert len(data["latencies_ms"]) == 8
    assert data["own_patch_first"] == 8  # each upload's own patch (its real embedding) ranks first
    assert data["command"].split()[1:3] == ["-m", "bench.serve"]  # the command that runs it again
    assert "retrieve.py serve --index" in data["server_command"] and "--device cpu" in data["server_command"]

    # The server's peak resident memory: a Python process with torch and a model loaded holds well over
    # 100 MiB, and no more than this machine has.
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert 100 < data["server_peak_mib"] < total_mib
    assert "| server peak MiB |" in result.stdout
    row = re.search(r"^\| 2,000 \| 2 \| 8 \| 0 \| ([\d.]+) \| \d+ \| \d+ \| \d+ \| (\d+) \|$", result.stdout, re.M)
    assert row and float(row.group(1)) == pytest.approx(data["rps"], abs=0.05)
    assert int(row.group(2)) == round(data["server_peak_mib"])
    text = record.read_text()
    assert "## Other bench\n\nkept\n" in text and "an older run" not in text  # its own section replaced
    assert text.count("## Search page under load (bench/serve.py)") == 1 and "| 2,000 | 2 | 8 | 0 |" in text
    assert (out / "serve.md").read_text().startswith("## Search page under load (bench/serve.py)")
    assert (tmp_path / "work" / "index" / "manifest.json").is_file()  # --work is kept
