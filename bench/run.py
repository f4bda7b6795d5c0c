#!/usr/bin/env python3
"""The benchmark suite (`make bench`): query latency in-process and over HTTP, throughput under load,
index build speed-up with cores, and the index at 100k / 1M vectors.

    python bench/run.py --data ../shared/datasets/london [--server-workers 1 2 3] [--skip-ann]

Measures, on the queries of the test split (dataset/split.py):
- inproc_floor_ms: median time of the query pipeline (decode, features, encode, search, verify) in
  this process, with each stage's median (stages_ms); with --floor-baseline, against another preset's
  floor, the two timed query by query in turns (floor_vs_baseline);
- http_p50_ms_c1 / http_p99_ms_c1 / rps_c1, rps_c8 / http_p99_ms_c8 and errors: POST /search over
  loopback, driven by wrk (Debian package `wrk`, script bench/wrk_search.lua) with 1 and 8
  connections, for each number of uvicorn workers in --server-workers (the headline figures are the
  configured default's, IMGSEARCH_WORKERS), each against the in-process floor measured again just
  before that server starts (inproc_floor_ms_before);
- rss_mb and pss_mb of the server (all its processes) after the load, and ready_s from start to /readyz = 200;
- index_build_s / index_build_speedup: bench/index_build.py with every core, and with one worker
  pinned to one core;
- ann: bench/ann.py (generated vectors of the encoder's dimension), its own section;
- served_1m: bench/million.py (a million map entries served through POST /search), its own section.
Records its figures in bench/results.json (bench/report.py) and the table between the markers in
BENCHMARKS.md, from them and the sections the other scripts recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import london
import numpy as np
import report

from common.pipeline import ALL_PRESETS
from common.settings import Settings
from common.threads import single_threaded_kernels
from dataset.layout import DatasetError, load_dataset
from dataset.split import split_queries
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer import store
from retrieval.query import STAGES, search_image, warm_up
from retrieval.searcher import Searcher

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REFUSED = (ImageDecodeError, NoKeypointsError)
PHASES = 2  # runs of each connection count in serve_and_load, taking turns


def load_searcher(settings: Settings) -> Searcher:
    """The served index version, loaded as the service loads it (without importing the app)."""
    family = store.index_family(settings.artifacts, settings.data_root, settings.preset)
    return Searcher(store.load(store.current_version(family)))


# --- in-process -----------------------------------------------------------------------------------


def inprocess(settings: Settings, images: list[bytes]) -> dict[str, Any]:
    single_threaded_kernels()  # as every `imgsearch serve` worker runs it
    searcher = load_searcher(settings)
    warm_up(searcher)  # as the service does before it is ready
    stages: list[dict[str, float]] = []

    def one(data: bytes) -> None:
        t: dict[str, float] = {}
        search_image(searcher, data, 10, timings=t)
        stages.append(t)

    # A few real queries first: first calls allocate. Single-threaded kernels: the thread's CPU time is all the work.
    t = harness.time_calls(one, images, warmup=5, skip=REFUSED)
    stages = stages[len(stages) - len(t.wall) :]  # the timed calls' (the warm-up's came first)
    return {
        "inproc_floor_ms": t.ms(50, 2),
        "inproc_floor_cpu_ms": t.cpu_ms(50, 2),
        "stages_ms": {s: round(1000 * float(np.median([x.get(s, 0.0) for x in stages])), 2) for s in STAGES},
    }


def floor_versus(settings: Settings, baseline: str, images: list[bytes]) -> dict[str, Any]:
    """The in-process floor of the preset against another preset's, the two in turns over the same
    images (machines and minutes differ, so only a ratio within one run means anything)."""
    single_threaded_kernels()
    pair = {name: load_searcher(settings.model_copy(update={"preset": name})) for name in (settings.preset, baseline)}
    for s in pair.values():
        warm_up(s)
    calls = {name: (lambda data, s=s: search_image(s, data, 10)) for name, s in pair.items()}
    ms = {name: t.ms(50, 2) for name, t in harness.in_turns(calls, images, skip=REFUSED).items()}
    preset_ms, baseline_ms = ms[settings.preset], ms[baseline]
    return {
        "baseline": baseline,
        "baseline_ms": baseline_ms,
        "preset_ms": preset_ms,
        "ratio": round(preset_ms / baseline_ms, 3),
    }


# --- HTTP -------------------------------------------------------------------------------------------


def serve_and_load(settings: Settings, image_files: list[Path], workers: int, duration_s: int) -> dict[str, Any]:
    env = os.environ | {
        "IMGSEARCH_DATA": str(settings.data_root),
        "IMGSEARCH_ARTIFACTS": str(settings.artifacts),
        "IMGSEARCH_PRESET": settings.preset,
        "IMGSEARCH_WORKERS": str(workers),
        "IMGSEARCH_LOG_FORMAT": "json",
    }
    with (
        tempfile.NamedTemporaryFile(prefix="imgsearch-bench-", suffix=".log") as log,
        server.serving(env, log=log) as srv,
    ):
        ready_s = server.wait_ready(srv.url, srv.proc, srv.t0, workers)
        all_ready_s = server.wait_loaded(Path(log.name), srv.proc, srv.t0, workers)
        # Warm-up, checked: every worker answers real searches before anything is timed.
        with httpx.Client(timeout=60) as c:
            for f in image_files[: 4 * workers]:
                r = c.post(f"{srv.url}/search", params={"k": 10}, files={"file": ("q.jpg", f.read_bytes())})
                if r.status_code != 200 or not r.json()["results"]:
                    raise RuntimeError(f"warm-up search failed: {r.status_code} {r.text[:200]}")
        pids = server.process_tree(srv.proc.pid)
        # The host's speed drifts over minutes: 1 and 8 connections take turns (PHASES runs each,
        # duration_s in all), so that their ratio compares the same stretch of time.
        runs: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
        cpu = {1: 0.0, 8: 0.0}
        for _ in range(PHASES):
            for connections in runs:
                # wrk stops with requests still in the server: their work must not count in the next run.
                server.wait_idle(pids)
                before = server.cpu_seconds(pids)
                runs[connections].append(
                    server.wrk(srv.url, image_files, connections, max(1, round(duration_s / PHASES)))
                )
                cpu[connections] += server.cpu_seconds(pids) - before
        server.wait_idle(pids)
        c1, c8 = server.merge_runs(runs[1]), server.merge_runs(runs[8])
        pids = server.process_tree(srv.proc.pid)
        rss = [server.rss_mb(p) for p in pids]
        pss = [server.pss_mb(p) for p in pids]
    return {
        "server_workers": workers,
        "http_p50_ms_c1": round(c1["p50_ms"], 2),
        "http_p99_ms_c1": round(c1["p99_ms"], 2),
        "rps_c1": round(c1["rps"], 2),
        # Server CPU per request (all its processes): what HTTP costs on top of the in-process CPU
        # time, which other jobs stretch far less than the wall times.
        "server_cpu_ms_per_request_c1": round(1000 * cpu[1] / max(c1["requests"], 1), 2),
        "server_cpu_ms_per_request_c8": round(1000 * cpu[8] / max(c8["requests"], 1), 2),
        "http_p50_ms_c8": round(c8["p50_ms"], 2),
        "http_p99_ms_c8": round(c8["p99_ms"], 2),
        "rps_c8": round(c8["rps"], 2),
        **{f"{k}_c{n}": c[k] for n, c in ((1, c1), (8, c8)) for k in ("requests", "errors", "statuses")},
        "rss_mb": round(sum(rss), 1),
        "rss_mb_by_process": sorted(rss, reverse=True),
        # Pages the workers share (memory-mapped encoder and keypoints) count once here.
        "pss_mb": round(sum(pss), 1),
        "ready_s": round(ready_s, 2),
        "all_workers_ready_s": round(all_ready_s, 2),
    }


# --- the other scripts (subprocesses) ---------------------------------------------------------------


def index_build(args: argparse.Namespace) -> dict[str, Any]:
    """All cores (one extraction process per core), then one process pinned to one core."""
    cores = os.cpu_count() or 1
    runs = {}
    for jobs, cpus in ((cores, None), (1, {min(os.sched_getaffinity(0))})):
        cmd = [sys.executable, str(BENCH / "index_build.py"), "--data", str(args.data)]
        cmd += ["--artifacts", str(args.artifacts), "--preset", args.preset, "--jobs", str(jobs)]
        # Pinned before exec, so BLAS, OpenMP and OpenCV size their thread pools for one core.
        pin = (lambda c=cpus: os.sched_setaffinity(0, c)) if cpus else None
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, preexec_fn=pin).stdout
        m = re.search(r"^INDEX_BUILD_JSON (\{.*\})$", out, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no result from index_build.py:\n{out}")
        runs["all_cores" if cpus is None else "one_core"] = json.loads(m.group(1))
        print(f"index build, {jobs} process(es): {m.group(1)}", flush=True)
    return {
        "index_build_s": runs["all_cores"]["total_s"],
        "index_build_one_core_s": runs["one_core"]["total_s"],
        "index_build_speedup": round(runs["one_core"]["total_s"] / runs["all_cores"]["total_s"], 3),
        "index_build_runs": runs,
    }


def script(name: str, *args: str) -> None:
    """Another bench script, which records its own section of the results."""
    subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, check=True)


# --- report ------------------------------------------------------------------------------------------


def http_floor(r: dict[str, Any]) -> float:
    """The in-process floor that HTTP p50 is compared with: the one measured just before the server
    (runs before that field existed: the floor at the start)."""
    return float(r.get("inproc_floor_ms_before", r["inproc_floor_ms"]))


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Each target, what was measured, met or not: ratios within one run, since hosts and minutes differ."""
    out: list[tuple[str, str, bool | None]] = []
    if "floor_vs_baseline" in r:
        f = r["floor_vs_baseline"]
        text = f"{f['ratio']:.3f} x ({f['preset_ms']} ms against {f['baseline_ms']} ms, queries in turn)"
        out.append((f"inproc floor <= 1.3 x `{f['baseline']}`", text, f["ratio"] <= 1.3))
    features = r.get("stages_ms", {}).get("features")
    if features:
        ratio = r["inproc_floor_ms"] / features
        text = f"{ratio:.2f} x ({r['inproc_floor_ms']} / {features} ms)"
        out.append(("inproc floor <= 2.5 x the features stage", text, ratio <= 2.5))
    if "http_p50_ms_c1" in r:
        ratio = r["http_p50_ms_c1"] / http_floor(r)
        text = f"{ratio:.3f} x ({r['http_p50_ms_c1']} / {http_floor(r)} ms, the floor just before the server)"
        if r.get("inproc_floor_cpu_ms") and r.get("server_cpu_ms_per_request_c1"):
            text += f"; CPU per request: {r['server_cpu_ms_per_request_c1'] / r['inproc_floor_cpu_ms']:.3f} x"
        out.append(("http_p50_ms_c1 <= 1.25 x inproc_floor_ms", text, ratio <= 1.25))
        out.append(("http_p50_ms_c1 <= 1.1 x inproc floor", text, ratio <= 1.1))
        gain, errors = r["rps_c8"] / r["rps_c1"], r["errors_c1"] + r["errors_c8"]
        text = f"{gain:.2f} x, {errors} errors ({r['server_workers']} workers)"
        out.append(("rps_c8 >= 1.7 x rps_c1, no errors", text, gain >= 1.7 and errors == 0))
        out.append(("rps_c8 >= 1.85 x rps_c1, no errors", text, gain >= 1.85 and errors == 0))
        text = f"{r['rss_mb']:.0f} MB RSS ({r['server_workers']} workers; PSS {r.get('pss_mb', '–')} MB)"
        out.append(("RSS of the serving tree <= 1.0 GB", text, r["rss_mb"] <= 1024))
        out.append(("ready_s <= 3 s", f"{r['ready_s']} s", r["ready_s"] <= 3))
    if "index_build_speedup" in r:
        sp = r["index_build_speedup"]
        out.append(("index_build_speedup >= 1.6", f"{sp:.2f}", sp >= 1.6))
    big = r.get("ann", {}).get("sizes", {}).get("1000000")
    if big is not None:
        best = big.get("fastest_at_recall_0.95")
        text = "none" if best is None else f"{index_label(best)}: {best['p50_ms']} ms, recall {best['recall_at_10']}"
        out.append(("1M vectors: p50 <= 2 ms at recall@10 >= 0.95", text, best is not None and best["p50_ms"] <= 2))
    served = r.get("served_1m")
    if served:
        ratio = served["search_p50_ms"] / served["exact_p50_ms"]
        text = (
            f"search stage {served['search_p50_ms']} ms / exact {served['exact_p50_ms']} ms = 1/{1 / ratio:.0f}, "
            f"recall@10 {served['recall_at_10']} (London queries: {served['recall_at_10_london_queries']})"
        )
        ok = ratio <= 0.01 and served["recall_at_10"] >= 0.95
        out.append((f"{served['n']:,} served: search <= 1/100 exact at recall@10 >= 0.95", text, ok))
        if "prior_over_plain" in served:
            text = (
                f"{served['prior_search_p50_ms']} ms with a {served['prior_radius_m']:g} m prior, "
                f"{served['search_p50_ms']} ms without: {served['prior_over_plain']} x"
            )
            out.append(
                (
                    f"{served['n']:,} served: prior search stage <= the unfiltered one",
                    text,
                    served["prior_over_plain"] <= 1.0,
                )
            )
        text = f"{served['rss_mb']:.0f} MB ({served['workers']} workers), ready in {served['ready_s']} s"
        out.append((f"{served['n']:,} served: RSS <= 6 GB", text, served["rss_mb"] <= 6144))
    return out


PARAMS = ("m", "coarse_m", "rerank", "shortlist", "nlist", "nprobe", "k_factor", "M", "efConstruction", "efSearch")


def index_label(row: dict[str, Any]) -> str:
    params = ", ".join(f"{k} {row[k]}" for k in PARAMS if k in row)
    return f"{row['index']} ({params})" if params else row["index"]


def markdown(r: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    rows: list[tuple[str, Any]] = [
        ("preset", f"`{r['preset']}`"),
        ("queries (the test split's areas)", r["queries"]),
        ("inproc_floor_ms (median)", r["inproc_floor_ms"]),
        ("in-process CPU ms per query (median)", r.get("inproc_floor_cpu_ms", "–")),
        *((f"stages_ms.{s} (median)", v) for s, v in r["stages_ms"].items()),
    ]
    if "floor_vs_baseline" in r:
        f = r["floor_vs_baseline"]
        rows += [
            (f"floor of `{f['baseline']}`, queries in turn (median ms)", f["baseline_ms"]),
            (f"floor of `{r['preset']}`, same run (median ms)", f["preset_ms"]),
            ("floor ratio (preset / baseline)", f["ratio"]),
        ]
    if "http_p50_ms_c1" in r:
        rows += [
            ("uvicorn workers (IMGSEARCH_WORKERS)", r["server_workers"]),
            ("http_p50_ms_c1", r["http_p50_ms_c1"]),
            ("http_p99_ms_c1", r["http_p99_ms_c1"]),
            ("in-process floor just before the server (median ms)", http_floor(r)),
            ("HTTP p50 / that floor", round(r["http_p50_ms_c1"] / http_floor(r), 3)),
            ("server CPU ms per request, 1 connection", r.get("server_cpu_ms_per_request_c1", "–")),
            ("rps_c1", r["rps_c1"]),
            ("rps_c8", r["rps_c8"]),
            ("rps_c8 / rps_c1", round(r["rps_c8"] / r["rps_c1"], 2)),
            ("http_p99_ms_c8", r["http_p99_ms_c8"]),
            ("errors, non-2xx or socket (1 / 8 connections)", f"{r['errors_c1']} / {r['errors_c8']}"),
            ("rss_mb (all server processes, after the load)", r["rss_mb"]),
            ("pss_mb (the same, shared pages counted once)", r.get("pss_mb", "–")),
            ("ready_s (start to /readyz)", r["ready_s"]),
            ("every worker loaded, s from start", r.get("all_workers_ready_s", "–")),
        ]
    if "index_build_s" in r:
        rows += [
            (f"index_build_s ({r['index_build_runs']['all_cores']['images']} map images)", r["index_build_s"]),
            ("index build, one core, s", r["index_build_one_core_s"]),
            ("index_build_speedup", r["index_build_speedup"]),
        ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if len(r.get("http_by_workers", [])) > 1:
        lines += [
            "",
            "By uvicorn workers (same run):",
            "",
            "| workers | floor ms just before | p50 ms c1 | p99 ms c1 | rps c1 | rps c8 | rps c8/c1 | p99 ms c8 "
            "| errors | server CPU ms/req c1, c8 | RSS MB (each) | PSS MB | ready s (first / every worker) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in r["http_by_workers"]:
            per = " + ".join(f"{v:.0f}" for v in h["rss_mb_by_process"])
            lines.append(
                f"| {h['server_workers']} | {h.get('inproc_floor_ms_before', '–')} | {h['http_p50_ms_c1']} | "
                f"{h['http_p99_ms_c1']} | {h['rps_c1']} | "
                f"{h['rps_c8']} | {h['rps_c8'] / h['rps_c1']:.2f} | {h['http_p99_ms_c8']} | "
                f"{h['errors_c1'] + h['errors_c8']} | {h['server_cpu_ms_per_request_c1']}, "
                f"{h['server_cpu_ms_per_request_c8']} | {h['rss_mb']} ({per}) | {h.get('pss_mb', '–')} | "
                f"{h['ready_s']} / {h.get('all_workers_ready_s', '–')} |"
            )
    for n, size in r.get("ann", {}).get("sizes", {}).items():
        lines += [
            "",
            f"ANN, {int(n):,} generated vectors of {r['ann']['dim']} dims ({size['queries']} queries; "
            f"p50 = one query, one thread):",
            "",
            "| index | parameters | build s | memory MB | p50 ms | p50 CPU ms | recall@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in size["indexes"]:
            params = ", ".join(f"{k} {row[k]}" for k in PARAMS if k in row)
            lines.append(
                f"| {row['index']} | {params or '–'} | {row['build_s']} | {row['memory_mb']} | {row['p50_ms']} | "
                f"{row.get('p50_cpu_ms', '–')} | {row['recall_at_10']} |"
            )
        if "hnsw_skipped" in size:
            lines += ["", size["hnsw_skipped"]]
    big = r.get("served_1m")
    if big:
        lines += [
            "",
            f"Served collection of {big['n']:,} map entries ({big['real_map_images']:,} London, the rest generated; "
            f"bench/million.py), {big['queries']} London test queries through POST /search, {big['workers']} workers:",
            "",
            "| measure | value |",
            "|---|---|",
            f"| index kind (indexer/kinds.py) | {big['index_kind']} |",
            f"| search_p50_ms (search stage, server log) | {big['search_p50_ms']} |",
            f"| exact_p50_ms (flat search of the same vectors, each just after the server answered the query) | "
            f"{big['exact_p50_ms']} |",
            f"| search / exact | {big['search_over_exact']} |",
            f"| recall_at_10 against exact (generated queries) | {big['recall_at_10']} |",
            f"| recall@10 against exact (London queries) | {big['recall_at_10_london_queries']} |",
            f"| London first-stage R@10, exact / served | {big['london_first_stage_r10_exact']} / "
            f"{big['london_first_stage_r10_served']} |",
            f"| London R@10 verified and expanded, exact / served index (in-process) | "
            f"{big['london_r10_exact_index']} / {big['london_r10_served_index']} |",
            f"| London R@10 through POST /search | {big['london_r10_through_search']} |",
            f"| stages p50 ms (server log) | {big['stages_p50_ms']} |",
            f"| with a position prior (fix sigma {big.get('prior_sigma_m', '–')} m, radius "
            f"{big.get('prior_radius_m', '–')} m): search stage p50 ms, ÷ without | "
            f"{big.get('prior_search_p50_ms', '–')}, {big.get('prior_over_plain', '–')} |",
            f"| with a position prior: map entries within the radius, p50 | {big.get('prior_candidates_p50', '–')} |",
            f"| with a position prior: stages p50 ms | {big.get('prior_stages_p50_ms', '–')} |",
            f"| HTTP p50 ms (one client) | {big['http_p50_ms']} |",
            f"| rss_mb / pss_mb (serving tree) | {big['rss_mb']} / {big['pss_mb']} |",
            f"| ready_s (first worker / every worker) | {big['ready_s']} / {big.get('all_workers_ready_s', '–')} |",
            f"| generate / index build / publish s | {big['generate_s']} / {big['index_build_s']} / "
            f"{big['publish_s']} |",
        ]
    lines += ["", "Targets:", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in targets(r)]
    return "\n".join(lines)


def write_markdown(path: Path, r: dict[str, Any]) -> str:
    table = markdown(r)
    m = r["machine"]
    head = (
        f"Machine: {report.describe(m)}, Python {m['python']}; load average {m['load_avg_start'][0]} at the "
        f"start, {m['load_avg_end'][0]} at the end; {r['created']}"
        + (f", commit {r['commit']}" if r.get("commit") else "")
        + f".\nCommand: `{r['command']}`"
    )
    report.write_markdown(BEGIN, END, f"{head}\n\n{table}", path)
    return table


def report_only(args: argparse.Namespace) -> int:
    """BENCHMARKS.md again from the results file (e.g. after bench/ann.py recorded a new section)."""
    result = report.load(args.out)
    if "inproc_floor_ms" not in result:
        print(f"bench: no suite figures in {args.out}", file=sys.stderr)
        return 2
    # The headline follows the configured default, if that run is in the table.
    result |= next((h for h in result.get("http_by_workers", []) if h["server_workers"] == Settings().workers), {})
    result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result)]
    report.record(report.SUITE, result, args.out, stamp=False)
    print(write_markdown(args.markdown, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    london.add_arguments(p)
    p.add_argument("--queries", type=int, default=200, help="test-split queries to send (default 200)")
    p.add_argument("--duration", type=int, default=20, help="seconds of each wrk run (default 20)")
    p.add_argument(
        "--server-workers", type=int, nargs="+", default=None, help="uvicorn workers to compare (default: the setting)"
    )
    p.add_argument(
        "--floor-baseline",
        choices=sorted(ALL_PRESETS),
        default=None,
        help="also time this preset's floor, query by query in turn with --preset (its index must be built)",
    )
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-index-build", action="store_true")
    p.add_argument("--skip-ann", action="store_true", help="keep the last `ann` section (slow to measure again)")
    p.add_argument("--ann-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--skip-served-1m", action="store_true", help="keep the last `served_1m` section")
    p.add_argument("--served-size", type=int, default=1_000_000, help="entries of that collection (bench/million.py)")
    p.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from --out")
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--markdown", type=Path, default=report.MARKDOWN)
    args = p.parse_args(argv)
    if args.report_only:
        return report_only(args)
    default_workers = Settings().workers
    server_workers = sorted(set(args.server_workers or []) | {default_workers})
    if args.queries < 1 or args.duration < 1 or min(server_workers) < 1:
        p.error("--queries, --duration and --server-workers must be >= 1")
    if not args.skip_http and shutil.which("wrk") is None:
        print(f"bench: {server.WRK_HINT}", file=sys.stderr)
        return 2
    settings = Settings(data=args.data, artifacts=args.artifacts, preset=args.preset)
    try:
        ds = load_dataset(args.data, check_files=False)
        loaded = load_searcher(settings).loaded
    except (DatasetError, OSError, ValueError) as e:
        print(f"bench: {e} (build the index first: imgsearch build)", file=sys.stderr)
        return 2
    searcher_dir = loaded.directory
    # The test split's queries: the same photos for every preset and run.
    rows = split_queries(ds.queries.loc, loaded.pipeline.split)["test"][: args.queries]
    files = [ds.image_path(ds.queries.paths[q]) for q in rows]
    images = [f.read_bytes() for f in files]
    result = {"preset": args.preset, "queries": len(files), "index_version": searcher_dir.name}
    result |= report.started("bench/run.py", argv) | inprocess(settings, images)
    print(f"in-process: {result['inproc_floor_ms']} ms {result['stages_ms']}", flush=True)
    if args.floor_baseline:
        result["floor_vs_baseline"] = floor_versus(settings, args.floor_baseline, images)
        print(f"floor against {args.floor_baseline}: {json.dumps(result['floor_vs_baseline'])}", flush=True)
    if not args.skip_http:
        by_workers = []
        for n in server_workers:
            # The floor again just before each server: a host's speed drifts over the minutes between
            # the first floor and the last server, and HTTP p50 / floor is to compare one stretch of time.
            before = inprocess(settings, images)["inproc_floor_ms"]
            by_workers.append(serve_and_load(settings, files, n, args.duration) | {"inproc_floor_ms_before": before})
            print(f"HTTP: {json.dumps(by_workers[-1])}", flush=True)
        result |= next(h for h in by_workers if h["server_workers"] == default_workers)
        result["http_by_workers"] = by_workers
    if not args.skip_index_build:
        result |= index_build(args)
    if not args.skip_ann:
        script("ann.py", "--index-dir", str(searcher_dir), "--preset", args.preset, "--out", str(args.out),
               "--sizes", *map(str, args.ann_sizes))  # fmt: skip
    if not args.skip_served_1m:
        script("million.py", "--data", str(args.data), "--artifacts", str(args.artifacts), "--preset", args.preset,
               "--size", str(args.served_size), "--out", str(args.out))  # fmt: skip
    # Targets over this run's figures and the sections beside them (kept ones say when they were measured).
    sections = {k: v for k, v in report.load(args.out).items() if k in report.SECTIONS}
    result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(sections | result)]
    print(write_markdown(args.markdown, report.record(report.SUITE, result, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
