"""The container's health check: healthy while the service is ready (GET /readyz answers 200), and a
restart when it has not been for too long.

Docker marks a container unhealthy, but restarts only containers that exit (`restart:` policies do
not act on health). So once the service has not been ready for `--restart-after` seconds in a row,
this check sends SIGTERM to the container's init process (compose runs the api with `init: true`,
which passes it on to `make serve`): the service stops, the container exits, and its restart policy
starts it again. The service heals itself first where it can (retries, the newest version that
loads: retrieval/live.py); a restart is for what it cannot undo from inside.

Standard library only, and quick: it runs every few seconds in the serving container.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def ready(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, str(getattr(e, "reason", e))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cli.healthcheck", description=__doc__.split("\n\n")[0])
    port = os.environ.get("IMGSEARCH_PORT", "8000")
    p.add_argument("--url", default=f"http://127.0.0.1:{port}/readyz", help="the readiness URL")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    p.add_argument(
        "--restart-after",
        type=float,
        # A string default goes through `type` too: a bad value is an error naming the option.
        default=os.environ.get("IMGSEARCH_HEALTH_RESTART_S", "300"),
        help="seconds not ready in a row before a restart (0: never; env IMGSEARCH_HEALTH_RESTART_S)",
    )
    p.add_argument(
        "--state", type=Path, default=Path("/tmp/imgsearch-unready-since"), help="where the first miss is kept"
    )
    p.add_argument("--pid", type=int, default=1, help="the process to stop for a restart (default: init)")
    args = p.parse_args(argv)
    if args.restart_after < 0 or args.timeout <= 0:
        p.error("--restart-after must be >= 0 and --timeout > 0")
    ok, why = ready(args.url, args.timeout)
    if ok:
        args.state.unlink(missing_ok=True)
        return 0
    now = time.time()
    try:
        since = float(args.state.read_text())
    except (OSError, ValueError):
        since = now
        args.state.write_text(str(now))
    down = now - since
    print(f"not ready ({why}) for {down:.0f} s", file=sys.stderr)
    if args.restart_after and down >= args.restart_after:
        print(f"not ready for {args.restart_after:.0f} s or more: stopping pid {args.pid} to restart", file=sys.stderr)
        args.state.unlink(missing_ok=True)
        try:
            os.kill(args.pid, signal.SIGTERM)
        except OSError as e:
            print(f"could not stop pid {args.pid}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
