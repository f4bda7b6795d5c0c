"""`imgsearch serve`'s supervisor of several uvicorn workers: uvicorn's own (restarts, signals, worker
pings), except that the first worker starts alone and the others once it serves.

Why: each worker imports the stack and loads the index on its own. Started all at once on a host with
fewer cores than workers, they share the cores until nearly all have loaded, and the first answer
waits for that (about twice the time one worker needs, with 3 workers on 2 cores). Started first, one
worker serves in about the time it needs alone, and the others come up behind it while it answers;
the last is ready somewhat later than when all start at once, the price of the earlier first answer.
"""

from __future__ import annotations

import logging
import time

from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger("uvicorn.error")

POLL_S = 0.05  # how often the supervisor asks the first worker whether it serves


class FirstWorkerFirst(Multiprocess):
    """uvicorn's Multiprocess, with the first worker started (and serving) before the others."""

    def init_processes(self) -> None:
        first = Process(self.config, self.sockets)
        first.start()
        self.processes.append(first)
        if self.processes_num > 1:
            t0 = time.monotonic()
            how = self._wait_serving(first, self.config.timeout_worker_healthcheck)
            took, more = time.monotonic() - t0, self.processes_num - 1
            log.info("first worker %s after %.2f s; starting %d more", how, took, more)
        for _ in range(self.processes_num - 1):
            process = Process(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def _wait_serving(self, first: Process, timeout: float) -> str:
        """Until the first worker serves, exits, or does neither within `timeout` s, or a signal
        arrives (the run loop handles it next): what happened, for the log. uvicorn's own
        Process.wait_until_ready would not see the signal: the handlers only queue it, and the run
        loop that acts on the queue has not started yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.signal_queue:
                return "not waited for (a signal arrived)"
            if not first.process.is_alive():
                return "exited"
            if first.is_ready(timeout=1):
                return "serving"
            time.sleep(POLL_S)
        return "not serving in time"
