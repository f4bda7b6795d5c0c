"""Thread settings of the numeric libraries for serving.

On this 2-core machine one request at a time gains little from BLAS, OpenMP (FAISS) or OpenCV
threads, and concurrent requests then fight over the cores; one thread per request measured faster
(bench/run.py: in-process floor 87 -> 71 ms) and leaves the second core to the next request.
"""

from __future__ import annotations


def single_threaded_kernels() -> None:
    import cv2
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    faiss.omp_set_num_threads(1)
    cv2.setNumThreads(1)
