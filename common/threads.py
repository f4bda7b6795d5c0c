"""Thread settings of the numeric libraries for serving.

On this 2-core machine one request at a time gains little from BLAS, OpenMP (FAISS) or OpenCV
threads, and concurrent requests then fight over the cores; one thread per request measured faster
(bench/run.py: in-process floor 87 -> 71 ms) and leaves the second core to the next request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_single_threaded = False  # set by single_threaded_kernels(), for the threads started after it


def single_threaded_kernels() -> None:
    global _single_threaded
    import cv2
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # BLAS: process-wide
    faiss.omp_set_num_threads(1)  # OpenMP: this thread only, see kernels_for_this_thread
    cv2.setNumThreads(1)  # process-wide
    _single_threaded = True


def kernels_for_this_thread() -> None:
    """OpenMP's thread count is a per-thread setting: a thread started after single_threaded_kernels()
    (the service's request thread pool) still ran FAISS on one OpenMP thread per core, which cost
    73 -> 127 ms CPU per query (bench/run.py, server CPU per request). Call it at the start of work in
    such a thread; it does nothing unless the process chose single-threaded kernels."""
    if _single_threaded:
        import faiss

        faiss.omp_set_num_threads(1)


@contextmanager
def single_threaded() -> Iterator[None]:
    """One thread for BLAS, FAISS (OpenMP, this thread) and OpenCV inside the block, restored after.

    For loops of small per-image calls, where waking the libraries' thread pools costs more than it
    saves: the visual words of one map image's 1,000 verification keypoints took 12.6 ms with the
    default threads and 1.4 ms with one (bench/index_build.py)."""
    import cv2
    import faiss
    from threadpoolctl import threadpool_limits

    omp, ocv = faiss.omp_get_max_threads(), cv2.getNumThreads()
    faiss.omp_set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(omp)
        cv2.setNumThreads(ocv)


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas for the threads started after this call. glibc gives each new thread
    its own arena (up to 8 per core); the request threads' short-lived image buffers then fragment
    them, and the resident memory of a busy server crept up for minutes (bench/soak.py). Returns
    False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False
