"""The one timing loop of the benchmarks: warm-up, repeats, calls taken in turns, percentiles, ratios.

Other jobs share these machines and a host's speed drifts over minutes, so a time alone says little:
what is compared is timed in the same loop, the calls in turns (the first one rotating from item to
item, so that none always runs on a fresher cache or a quieter minute), and reported as a ratio.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def summarise(ms: Iterable[float], qs: Sequence[float] = (50, 99), digits: int = 2) -> dict[str, Any]:
    """Count, percentiles (p50_ms, p99_ms, ...) and max of times in ms; None for each without times."""
    a = np.asarray(list(ms), dtype=float)
    out: dict[str, Any] = {"n": len(a)}
    for q in qs:
        out[f"p{q:g}_ms"] = round(float(np.percentile(a, q)), digits) if len(a) else None
    out["max_ms"] = round(float(a.max()), digits) if len(a) else None
    return out


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b of one run, None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, digits)


@dataclass
class Samples:
    """Wall and CPU seconds (of the calling thread: the work itself, which other jobs stretch far
    less than the wall time) of each timed call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float = 0.0) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def ms(self, q: float = 50, digits: int = 3) -> float:
        return round(1000 * float(np.percentile(self.wall, q)), digits)

    def cpu_ms(self, q: float = 50, digits: int = 3) -> float:
        return round(1000 * float(np.percentile(self.cpu, q)), digits)

    def summary(self, qs: Sequence[float] = (50, 90), digits: int = 3) -> dict[str, Any]:
        return summarise((1000 * s for s in self.wall), qs, digits)


def clock(call: Callable[[T], Any], arg: T) -> tuple[float, float, Any]:
    """(wall s, this thread's CPU s, result) of one call."""
    t0, c0 = time.perf_counter(), time.thread_time()
    out = call(arg)
    return time.perf_counter() - t0, time.thread_time() - c0, out


def rotated(names: Sequence[T], i: int) -> list[T]:
    """names, starting at the i-th (mod len): the order of the calls for item i."""
    i %= len(names)
    return [*names[i:], *names[:i]]


def in_turns(
    calls: Mapping[str, Callable[[Any], Any]],
    items: Sequence[T],
    *,
    rounds: int = 1,
    warmup: int = 0,
    prepare: Callable[[T], Any] | None = None,
    skip: tuple[type[BaseException], ...] = (),
) -> dict[str, Samples]:
    """Every item through every call, in turns, `rounds` times; the first `warmup` items go through
    each call once untimed before (first calls allocate and page in). `prepare(item)`, untimed, runs
    before each call and makes its argument (e.g. a cache evicted, rows drawn); without it the call
    gets the item. A call that raises one of `skip` (an image without keypoints) is not timed."""
    names = list(calls)
    arg = prepare or (lambda x: x)
    for item in items[:warmup]:
        for name in names:
            with contextlib.suppress(*skip):
                calls[name](arg(item))
    out = {name: Samples() for name in names}
    for _ in range(rounds):
        for i, item in enumerate(items):
            for name in rotated(names, i):
                try:
                    wall, cpu, _ = clock(calls[name], arg(item))
                except skip:
                    continue
                out[name].add(wall, cpu)
    return out


def time_calls(call: Callable[[Any], Any], items: Sequence[T], **kw: Any) -> Samples:
    """One call over the items: in_turns with a single call."""
    return in_turns({"": call}, items, **kw)[""]
