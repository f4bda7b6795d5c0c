#!/usr/bin/env python3
"""Post every query image of a data folder to a running service's /search and score the answers on
the client side against london_gt.h5: `imgsearch evaluate --url`, with this script's defaults (the
service at IMGSEARCH_HOST:IMGSEARCH_PORT, every query of the folder unless --split).

    python scripts/client_evaluate.py --data ../shared/datasets/london --split test [--json]
    python scripts/client_evaluate.py --data DIR                      # every query of the folder

--split uses the train/val/test split saved with the served index (found under --artifacts for the
preset, or --split-file), so the figures are those of GET /metrics/precision, key for key.
"""

from __future__ import annotations

import os
import sys

from cli.main import main

if __name__ == "__main__":
    url = f"http://{os.environ.get('IMGSEARCH_HOST', '127.0.0.1')}:{os.environ.get('IMGSEARCH_PORT', '8000')}"
    # argparse keeps an option's last value: the caller's --url and --split win over these.
    sys.exit(main(["evaluate", "--url", url, "--split", "all", *sys.argv[1:]]))
