"""OpenBLAS thread count for the services that do (almost) no BLAS work."""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
"""What OpenBLAS reads for its thread count, in its own order of precedence."""


def single_threaded_blas(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Let OpenBLAS start no worker threads in this process, unless the user chose a count; True if set here.

    Must run before numpy is imported (OpenBLAS reads it when it loads).
    gallery_bridge and nomad do little BLAS work (a matrix-vector product for
    the gallery's CLIP check, none in the crawl), while OpenBLAS's workers spin
    after numpy's import: ~140 ms of CPU per process start on the 2-core box
    (docs/gallery_bridge.md, Benchmark), CPU the models then lack.
    """
    if any(environ.get(name) for name in BLAS_THREAD_VARS) or "numpy" in sys.modules:
        return False
    environ["OPENBLAS_NUM_THREADS"] = "1"
    return True
