"""numpy's BLAS threads inside Ray tasks.

OpenBLAS (numpy's BLAS in its Linux wheels) reads OMP_NUM_THREADS / OPENBLAS_NUM_THREADS once,
when numpy is first imported. A Ray worker imports numpy at start-up, before Ray sets
OMP_NUM_THREADS to the task's CPU count, so every worker runs one OpenBLAS thread per core. Two
encode tasks on a 2-core machine then run four BLAS threads that spin while waiting for each
other, and the pass burns about twice the CPU time it needs (BENCHMARKS.md). match_task() puts
OpenBLAS back in line with the task's allocation.

OpenBLAS is reached through ctypes (its documented C API, openblas_set_num_threads), found
among the libraries this process has loaded. Where numpy uses another BLAS (MKL, Accelerate)
this module finds no OpenBLAS and does nothing.
"""

from __future__ import annotations

import ctypes
import glob
import os

# The symbol's name by how OpenBLAS was built: numpy >= 2 bundles scipy-openblas (64-bit ints,
# prefixed), numpy 1.x bundled openblas64_, and distributions ship plain OpenBLAS.
_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "")

_lib_state: list = []  # [(set, get)] or [None] once looked up


def _loaded_openblas_paths() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ", 5)[-1].strip()
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:  # not Linux: numpy's wheels keep their libraries next to the package
        import numpy

        here = os.path.dirname(numpy.__file__)
        paths = glob.glob(os.path.join(here, ".dylibs", "*openblas*")) + glob.glob(
            os.path.join(os.path.dirname(here), "numpy.libs", "*openblas*")
        )
    # numpy's own first: another package (faiss-cpu, say) may have loaded an OpenBLAS of its own
    return sorted(paths, key=lambda p: "numpy" not in p)


def _functions():
    if not _lib_state:
        import numpy  # noqa: F401  (loads numpy's OpenBLAS)

        found = None
        for path in _loaded_openblas_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for pre in _PREFIXES:
                for suf in _SUFFIXES:
                    setter = getattr(lib, f"{pre}_set_num_threads{suf}", None)
                    getter = getattr(lib, f"{pre}_get_num_threads{suf}", None)
                    if setter is not None and getter is not None:
                        setter.argtypes, setter.restype = [ctypes.c_int], None
                        getter.argtypes, getter.restype = [], ctypes.c_int
                        found = (setter, getter)
                        break
                if found:
                    break
            if found:
                break
        _lib_state.append(found)
    return _lib_state[0]


def threads() -> int | None:
    """OpenBLAS's current thread count, or None where numpy does not use OpenBLAS."""
    fns = _functions()
    return int(fns[1]()) if fns else None


def set_threads(n: int) -> None:
    fns = _functions()
    if fns and n >= 1 and fns[1]() != n:
        fns[0](int(n))


def match_task() -> None:
    """Inside a Ray task or actor: as many OpenBLAS threads as the CPUs Ray gave it (Ray says
    so in OMP_NUM_THREADS). A no-op outside Ray or where that variable is unset."""
    want = os.environ.get("OMP_NUM_THREADS", "")
    if want.isdigit():
        set_threads(int(want))
