import os
import subprocess
import sys
from pathlib import Path

from histo_retrieval.search.openblas import choose_core_type, core_type_for, cpu_flags

REPO = Path(__file__).resolve().parent.parent
AVX512 = {"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_the_best_kernel_family_the_flags_allow() -> None:
    assert core_type_for(AVX512) == "SKYLAKEX"
    assert core_type_for(AVX512 - {"avx512bw"}) == "HASWELL"  # AVX-512 without all of SkylakeX's parts
    assert core_type_for({"sse2", "avx", "avx2", "fma"}) == "HASWELL"
    assert core_type_for({"sse2", "avx", "avx2"}) is None  # no FMA: OpenBLAS chooses
    assert core_type_for(set()) is None  # not x86 (or no /proc/cpuinfo)


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                       f"flags\t\t: {' '.join(sorted(AVX512))}\n\nprocessor\t: 1\nflags\t\t: sse2\n")
    assert cpu_flags(cpuinfo) == AVX512
    assert cpu_flags(tmp_path / "absent") == set()
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_flags(tmp_path / "arm") == set()


def test_a_users_choice_is_kept_and_an_unset_one_is_chosen(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t: {' '.join(sorted(AVX512))}\n")
    environ = {"OPENBLAS_CORETYPE": "HASWELL"}
    assert choose_core_type(environ, cpuinfo) == "HASWELL" and environ == {"OPENBLAS_CORETYPE": "HASWELL"}
    environ = {}
    assert choose_core_type(environ, cpuinfo) == "SKYLAKEX" and environ == {"OPENBLAS_CORETYPE": "SKYLAKEX"}
    environ = {}
    assert choose_core_type(environ, tmp_path / "absent") is None and environ == {}


def test_importing_the_search_package_sets_it_before_faiss_loads() -> None:
    """What faiss's OpenBLAS picks in a fresh process that imports the package, as the scripts do:
    with OPENBLAS_VERBOSE=2 each OpenBLAS prints its kernels when it loads (numpy's first, faiss's last)."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    env["OPENBLAS_VERBOSE"] = "2"
    code = ("import os, sys; from histo_retrieval.search import vector_index; "
            "print('chosen', os.environ.get('OPENBLAS_CORETYPE'), 'faiss' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    printed = (out.stdout + out.stderr).split("\n")
    chosen = core_type_for(cpu_flags())
    assert f"chosen {chosen} True" in printed
    cores = [line.split(":", 1)[1].strip() for line in printed if line.startswith("Core:")]
    if chosen is not None:  # an x86 CPU with AVX2: faiss's OpenBLAS loaded the chosen kernels
        assert cores and cores[-1].upper() == chosen, printed
