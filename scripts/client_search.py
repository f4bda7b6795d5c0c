#!/usr/bin/env python3
"""Search the service with one image and print the ranked map images.

python scripts/client_search.py IMAGE [-k K] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, help="a photo to search with")
    p.add_argument("-k", type=int, default=10, help="how many results (1..100, default 10)")
    default_url = f"http://{os.environ.get('IMGSEARCH_HOST', '127.0.0.1')}:{os.environ.get('IMGSEARCH_PORT', '8000')}"
    p.add_argument("--url", default=default_url, help=f"service address (default {default_url})")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    args = p.parse_args(argv)
    if not 1 <= args.k <= 100:
        p.error("-k must be between 1 and 100")
    if not args.image.is_file():
        p.error(f"{args.image}: no such file")
    try:
        with args.image.open("rb") as f:
            r = httpx.post(f"{args.url}/search", params={"k": args.k}, files={"file": (args.image.name, f)}, timeout=60)
    except httpx.TransportError as e:
        print(f"search.py: cannot reach {args.url}: {e}", file=sys.stderr)
        return 3
    if r.status_code != 200:
        try:
            body = r.json()
            msg = f"{body.get('code')}: {body.get('detail')}"
        except ValueError:
            msg = r.text[:200]
        print(f"search.py: HTTP {r.status_code}: {msg}", file=sys.stderr)
        return 1
    body = r.json()
    if args.json:
        print(r.text)
        return 0
    print(f"{'rank':>4}  {'score':>6}  {'dist':>7}  {'easting':>11} {'northing':>12} {'hdg':>5}  path")
    for h in body["results"]:
        loc = h["location"]
        print(
            f"{h['rank']:>4}  {h['score']:6.3f}  {h['distance']:7.3f}  {loc['easting']:11.1f} "
            f"{loc['northing']:12.1f} {loc['heading']:5.0f}  {h['path']}"
        )
    print(f"({body['preset']}, index {body['index_version']}, {body['took_ms']:.1f} ms in the service)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
