"""The BLAS kernels faiss runs its k-means and flat searches on.

The faiss-cpu wheel brings its own OpenBLAS (0.3.15 in faiss 1.15), which picks its kernels by the
CPU's model. A CPU it does not know by name, as a virtual machine often reports one ("Intel(R)
Xeon(R) Processor"), gets the generic Prescott kernels: about 8 times slower than the AVX-512 ones
the same CPU runs (bench/results.md, "faiss's BLAS kernels"). OpenBLAS reads OPENBLAS_CORETYPE when
it loads, so choose_core_type() sets it from the CPU's instruction-set flags before faiss is
imported; a value the user set is kept.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path

__all__ = ["core_type_for", "cpu_flags", "choose_core_type"]

# The instruction sets each OpenBLAS kernel family needs, best first.
CORE_TYPES = (
    ("SKYLAKEX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma"}),
    ("HASWELL", {"avx2", "fma"}),
)


def core_type_for(flags: Iterable[str]) -> str | None:
    """The best OpenBLAS kernel family a CPU with these /proc/cpuinfo flags runs, or None (leave
    OpenBLAS to choose: another architecture, or an x86 CPU without AVX2)."""
    flags = set(flags)
    return next((name for name, needed in CORE_TYPES if needed <= flags), None)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags (empty where there is no /proc/cpuinfo or no x86 flags line)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose_core_type(environ: MutableMapping[str, str] = os.environ, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Set OPENBLAS_CORETYPE from the CPU's flags unless it is set; returns the value in force."""
    if not environ.get("OPENBLAS_CORETYPE"):
        chosen = core_type_for(cpu_flags(cpuinfo))
        if chosen is not None:
            environ["OPENBLAS_CORETYPE"] = chosen
    return environ.get("OPENBLAS_CORETYPE")
