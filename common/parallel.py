"""fn(path, conf) over many files on every core, in order, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from common.threads import single_threaded_kernels

T = TypeVar("T")
C = TypeVar("C")  # the conf fn is given with each file: anything picklable


def _apply(job: tuple[Callable[[str, C], T], str, C]) -> T:
    fn, path, conf = job
    return fn(path, conf)


def map_files(
    fn: Callable[[str, C], T],
    paths: Iterable[Path],
    conf: C,
    jobs: int | None = None,
    desc: str = "features",
) -> Iterator[T]:
    """fn(path, conf) for every file, in order, in `jobs` processes (default: one per core).

    `fn` must be a module-level function (it is pickled to the workers). Files are read inside the
    workers one at a time, so no more than a few images are in memory. Each worker process runs its
    numeric libraries on one thread: with one process per core, their own thread pools (BLAS, OpenMP
    in FAISS, OpenCV) would oversubscribe the cores (bench/index_build.py).
    """
    work = [(fn, str(p), conf) for p in paths]
    jobs = jobs or os.cpu_count() or 1
    bar = tqdm(total=len(work), desc=desc, unit="img", disable=None)
    pool = None
    if jobs == 1:
        results: Iterator[T] = map(_apply, work)
    else:
        # Spawned, not forked: a child forked after OpenCV's or OpenMP's thread pools have run in this
        # process hangs in cv2.setNumThreads (`make run` did, right after generating the demo data).
        pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=single_threaded_kernels
        )
        results = pool.map(_apply, work, chunksize=16)
    try:
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
