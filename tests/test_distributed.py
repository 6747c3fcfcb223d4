"""histo_retrieval.distributed: the collectives of train.py under torchrun (two gloo processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One thread per process; the script in a temporary folder imports this checkout's library.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


GATHER_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from histo_retrieval.distributed import all_gather_lists, gather_with_grad
dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()
(y,), labels = gather_with_grad([x], torch.full((3,), rank))
weights = torch.arange(12.0).reshape(6, 2)
(y * weights).sum().backward()
assert torch.equal(y, torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10]))
assert labels.tolist() == [0, 0, 0, 1, 1, 1]
# Both processes back-propagate the same loss: each gets world_size times its rows of d loss / d y.
assert torch.equal(x.grad, 2 * weights[3 * rank: 3 * rank + 3]), x.grad
# Every process gets every process's list, in rank order (train.py's report of unreadable images).
assert all_gather_lists([("file", rank)] * (rank + 1)) == [("file", 0), ("file", 1), ("file", 1)]
sys.stdout.write(f"ok{rank}\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gather_embeddings_gives_each_process_its_share_of_the_global_gradient(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok0" in result.stdout and "ok1" in result.stdout
