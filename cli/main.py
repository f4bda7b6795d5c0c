"""One command line for every stage: imgsearch {presets,data,train,index,build,evaluate,serve}.

Settings come from IMGSEARCH_* variables (common/settings.py, the README); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.core.logs import OWN_LOGGERS
from common.pipeline import ABLATIONS, ALL_PRESETS, PRESETS, UnknownPresetError, get_pipeline
from common.settings import Settings

if TYPE_CHECKING:
    from dataset.layout import Dataset


# What the optional extras of pyproject.toml install: `train` (Keras models, the evaluation's figures)
# and `ray` (the cluster engine).
EXTRAS = {"tensorflow": "train", "keras": "train", "matplotlib": "train", "ray": "ray"}


# uvicorn's supervisor kills a worker that does not answer its ping within this time (its default: 5 s).
# A worker loading a million-entry index holds the GIL in long calls; on a slow host that passed 5 s,
# and the workers were killed and started again in a loop (bench/million.py).
WORKER_PING_TIMEOUT_S = 60


def _domain_errors(command: str) -> tuple[type[Exception], ...]:
    """The errors that end a command with a message and exit code 2 rather than a traceback."""
    # Imported here, not at the top: `imgsearch serve` stays the uvicorn supervisor, which should not
    # hold NumPy, FAISS and OpenCV in memory for nothing (its workers import them).
    from common.files import StorageError
    from dataset.layout import DatasetError
    from indexer.store import IndexLoadError

    # ConnectionError: ray.init could not reach the cluster at --address. StorageError: a full,
    # read-only or failing disk refused a version or the log (nothing half-written stays).
    errors: tuple[type[Exception], ...] = (
        DatasetError,
        IndexLoadError,
        UnknownPresetError,
        ConnectionError,
        StorageError,
    )
    if command != "serve":  # `imgsearch serve` (the server's own process) never loads training code
        from model.train import TrainingError

        errors += (TrainingError,)
    return errors


def _settings(args: argparse.Namespace) -> Settings:
    """The settings: IMGSEARCH_* variables, with the command's flags over them."""
    flags = {name: getattr(args, name, None) for name in ("data", "artifacts", "preset", "workers")}
    return Settings(**{k: v for k, v in flags.items() if v is not None})


@dataclass(frozen=True)
class AppFactory:
    """uvicorn's app factory for `imgsearch serve`: the validated settings, pickled to each worker. The
    app is imported in the worker: the supervisor holds none of NumPy, FAISS or OpenCV."""

    settings: Settings

    def __call__(self) -> Any:
        from app.main import create_app

        return create_app(self.settings)


def cmd_presets(args: argparse.Namespace) -> int:
    """The presets a user picks from (--all: the ablations behind the results table too), each as
    its stage choices; --json: the typed confs."""
    names = list(ALL_PRESETS if args.all else PRESETS)
    if args.json:
        print(json.dumps({n: get_pipeline(n).model_dump(mode="json") for n in names}, indent=1))
        return 0
    stages = ("features", "vector", "encoder", "index", "verify", "expand")
    rows = [["preset", *stages]] + [
        [n, *(str(ALL_PRESETS[n].get(st) or ("auto" if st == "index" else "-")) for st in stages)] for n in names
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        if args.all and i == len(PRESETS) + 1:
            print("ablations:")
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not args.all:
        print(f"{len(ABLATIONS)} ablations more: imgsearch presets --all")
    return 0


def _dataset(s: Settings) -> Dataset:
    from cli.stages import ensure_data
    from dataset.layout import load_dataset

    return load_dataset(ensure_data(s.data, s.demo_data))


def cmd_data(args: argparse.Namespace) -> int:
    from dataset import synthetic

    out = args.out or _settings(args).demo_data
    print(synthetic.main(Path(out), synthetic.confs[args.size], overwrite=args.overwrite))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cli.stages import run_train

    s = _settings(args)
    print(run_train(s.preset, _dataset(s), s.artifacts, args.jobs))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from cli.stages import run_index
    from indexer import store
    from retrieval.live import compact

    s = _settings(args)
    if args.rollback or args.compact:
        family = store.index_family(s.artifacts, s.data_root, s.preset)
        # Running servers see CURRENT change and swap to the version it names.
        print(store.rollback(family)[1] if args.rollback else compact(family))
        return 0
    if args.engine == "ray":
        import ray

        from cluster import connect
        from cluster.indexing import RayEngine

        dataset = _dataset(s)  # refused before connecting to a cluster when the data folder is wrong
        connect(args.address)
        try:
            engine = RayEngine(args.actors)
            print(run_index(s.preset, dataset, s.artifacts, args.jobs, args.force, args.shards or 2, engine))
        finally:
            ray.shutdown()
        return 0
    # Without --shards, a current version of any shard count will do; a new one has 1.
    print(run_index(s.preset, _dataset(s), s.artifacts, args.jobs, force=args.force, shards=args.shards))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from cli.stages import build_all

    s = _settings(args)
    print(build_all(s.data, s.artifacts, s.preset, args.jobs))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The one evaluation (evaluation/evaluate.py): presets in process, or with --url a running
    service's answers to POST /search scored here; the same summary either way."""
    from evaluation import compare
    from indexer import store

    s = _settings(args)
    dataset = _dataset(s)
    if args.url:
        import httpx

        from evaluation.evaluate import evaluate_service, held_out_rows

        if args.concurrency < 1:
            print("imgsearch: error: --concurrency must be >= 1", file=sys.stderr)
            return 2
        split_file = args.split_file
        if split_file is None and args.split != "all":  # the split saved with the served index
            split_file = store.current_version(store.index_family(s.artifacts, s.data_root, s.preset)) / "split.json"
        rows = held_out_rows(dataset, args.split, split_file)
        if len(rows) == 0:
            print(
                f"imgsearch: error: no {args.split} queries in {split_file}: the served model learned from every "
                "labelled query; its held-out figures are the cross-validated ones (GET /metrics/precision, "
                "imgsearch evaluate without --url)",
                file=sys.stderr,
            )
            return 2
        try:
            summary = evaluate_service(args.url, dataset, rows, args.split, args.concurrency).summary
        except httpx.HTTPError as e:
            print(f"imgsearch: error: {args.url}: {e}", file=sys.stderr)
            return 3
        print(json.dumps(summary, indent=1) if args.json else compare.markdown_table({args.url: summary}, "–"))
        return 0
    if args.prior:
        return _evaluate_priors(args, s, dataset)
    from cli.stages import run_cv
    from evaluation.cv import CrossValidation

    out = args.out or store.data_dir(s.artifacts, dataset.root) / "evaluation"
    # run_cv cross-validates what has not been yet (the served indexes are not needed)
    results = {p: CrossValidation.load(run_cv(p, dataset, s.artifacts, args.jobs)) for p in args.presets or [s.preset]}
    md = compare.main(results, dataset, out, baseline=args.baseline)
    print((out / "results.json" if args.json else md).read_text(encoding="utf-8"))
    print(f"written to {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _prior_scenario(text: str) -> tuple[float, float]:
    """SIGMA:RADIUS in metres, for argparse."""
    try:
        sigma, radius = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIGMA:RADIUS in metres (e.g. 30:100), got {text!r}") from None
    if not (0 < sigma < float("inf") and 0 < radius <= 5000):
        raise argparse.ArgumentTypeError(f"{text!r}: SIGMA must be > 0 and RADIUS in (0, 5000]")
    return sigma, radius


def _evaluate_priors(args: argparse.Namespace, s: Settings, dataset: Dataset) -> int:
    """Cross-validated searches with simulated position priors, against the fix alone."""
    from cli.stages import run_prior_cv
    from evaluation.prior_cv import Scenario, markdown

    scenarios = [Scenario(sigma, radius) for sigma, radius in args.prior]
    for preset in args.presets or [s.preset]:
        path = run_prior_cv(preset, dataset, s.artifacts, scenarios, args.prior_seed, args.jobs)
        print(path.read_text(encoding="utf-8") if args.json else markdown(json.loads(path.read_text("utf-8"))))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging.config
    import shutil
    import tempfile

    import uvicorn

    from app.core.logs import log_config, route_stderr_to_log
    from app.core.server import DeadlineProtocol, raise_open_files_limit
    from features.limits import MAX_PIXELS

    if args.engine == "ray":
        from cluster import serving

        shard_replicas = serving.SHARD_REPLICAS if args.shard_replicas is None else args.shard_replicas
        serving.run(
            _settings(args), args.address, args.replicas, lambda m: print(m, flush=True), shard_replicas=shard_replicas
        )
        return 0
    from app.core.server import Deadlines

    s = _settings(args)
    logging.config.dictConfig(log_config(s.log_format, verbose=args.verbose))
    if s.log_format == "json":
        route_stderr_to_log()
    # Inherited by the workers: each may hold max_connections sockets.
    raise_open_files_limit(s.max_connections)
    # Backstop inside OpenCV for the header check in features/decode.py (read at the first decode).
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
    # prometheus_client picks its mode when it is first imported (in the workers, after this), from
    # PROMETHEUS_MULTIPROC_DIR: several workers share a fresh, empty folder of per-process files so that
    # /metrics sums them; a single worker keeps everything in memory. A folder left from an earlier
    # run would add its counts, so an inherited value is never reused.
    os.environ.pop("prometheus_multiproc_dir", None)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    prom_dir = tempfile.mkdtemp(prefix="imgsearch-prometheus-") if s.workers > 1 else None
    if prom_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
        # By name: run as `python -m cli.main`, this module is __main__, which is no logger of the project.
        logging.getLogger("cli.main").info("%d workers; prometheus multiprocess folder %s", s.workers, prom_dir)
    try:
        # The settings travel to the workers inside the app factory and the protocol (uvicorn pickles its
        # config to the processes it spawns), so every worker serves what this process validated.
        app = AppFactory(s)
        serve: dict[str, Any] = dict(  # the keyword arguments of uvicorn.run and of uvicorn.Config
            factory=True,
            host=s.host,
            port=s.port,
            workers=s.workers,
            log_config=log_config(s.log_format, verbose=args.verbose),
            log_level="info",
            access_log=False,  # replaced by the request log line of app.core.observability
            timeout_worker_healthcheck=WORKER_PING_TIMEOUT_S,
            # Header and body read deadlines.
            http=functools.partial(DeadlineProtocol, deadlines=Deadlines.from_settings(s)),
            # Requests past this many connections (or running requests) in a worker are answered 503.
            limit_concurrency=s.max_connections,
        )
        if s.workers == 1:
            uvicorn.run(app, **serve)
        else:  # uvicorn's supervisor, but the first worker serves before the others start
            from cli.supervisor import FirstWorkerFirst

            conf = uvicorn.Config(app, **serve)
            with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
                FirstWorkerFirst(conf, sockets=[conf.bind_socket()]).run()
    finally:
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsearch", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="also other libraries' INFO logs")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", type=Path, help="data folder in the course layout (env IMGSEARCH_DATA)")
        sp.add_argument("--artifacts", type=Path, help="artifacts folder (env IMGSEARCH_ARTIFACTS)")
        sp.add_argument(
            "--preset", metavar="NAME", help="pipeline preset (env IMGSEARCH_PRESET; list: imgsearch presets)"
        )

    def jobs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-j", "--jobs", type=int, default=None, help="processes for feature extraction (default: one per core)"
        )

    def engine(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--engine",
            choices=["embedded", "ray"],
            default="embedded",
            help="embedded: this machine (default); ray: a Ray cluster (pip install '.[ray]')",
        )
        sp.add_argument("--address", default=None, help="ray: the cluster's address (default: RAY_ADDRESS or local)")

    sp = sub.add_parser("presets", help="list the pipeline presets and their stage choices")
    sp.add_argument("--all", action="store_true", help="the ablations behind the results table too")
    sp.add_argument("--json", action="store_true", help="print the typed stage confs")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("data", help="generate the synthetic demo data set")
    common(sp)
    sp.add_argument("--out", type=Path, help="output folder (default: <artifacts>/demo-data)")
    sp.add_argument("--size", choices=["demo", "tiny"], default="demo")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_data)

    sp = sub.add_parser("train", help="extract features and train the preset's Siamese model")
    common(sp)
    jobs(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("index", help="embed every map image and publish a new index version")
    common(sp)
    jobs(sp)
    sp.add_argument("--force", action="store_true", help="build a new version even if one is current")
    engine(sp)
    sp.add_argument(
        "--shards", type=int, default=None, help="split the index into N shards by image id (default: 1; ray: 2)"
    )
    sp.add_argument("--actors", type=int, default=None, help="ray: extraction actors (default: one per cluster CPU)")
    what = sp.add_mutually_exclusive_group()
    what.add_argument(
        "--rollback", action="store_true", help="serve the version served before the current one again (no build)"
    )
    what.add_argument(
        "--compact",
        action="store_true",
        help="publish the current version with the online changes folded in, then condense the change log",
    )
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("build", help="build whatever is missing: data, features, model, index")
    common(sp)
    jobs(sp)
    sp.set_defaults(func=cmd_build)

    sp = sub.add_parser(
        "evaluate",
        help="compare presets by area-fold cross-validation (in process), or score a running service's answers",
    )
    common(sp)
    jobs(sp)
    sp.add_argument("--presets", nargs="+", metavar="NAME", help="presets to compare (default: --preset)")
    sp.add_argument("--baseline", default="bow", help="preset for the paired R@1 difference (default bow)")
    sp.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        default="all",
        help="--url: which queries of the served index's split.json (default all: every query)",
    )
    sp.add_argument("--out", type=Path, help="output folder (default: <artifacts>/<data>/evaluation)")
    sp.add_argument("--url", help="score the answers of the service running there (POST /search) instead")
    sp.add_argument("--split-file", type=Path, help="--url: split.json to use (default: the served index's)")
    sp.add_argument("--concurrency", type=int, default=2, help="--url: requests in flight (default 2)")
    sp.add_argument("--json", action="store_true", help="print the figures as JSON")
    sp.add_argument(
        "--prior",
        nargs="+",
        type=_prior_scenario,
        metavar="SIGMA:RADIUS",
        help="instead: cross-validate searches with a simulated phone fix (noise SIGMA m per axis, radius "
        "RADIUS m) against the fix alone, e.g. --prior 30:100 50:150",
    )
    sp.add_argument("--prior-seed", type=int, default=0, help="--prior: seed of the simulated fixes (default 0)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("serve", help="serve the HTTP API")
    common(sp)
    sp.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (env IMGSEARCH_WORKERS)")
    engine(sp)
    sp.add_argument(
        "--replicas", type=int, default=None, help="ray: ingress replicas (default: autoscaled from 1 to 4)"
    )
    sp.add_argument(
        "--shard-replicas",
        type=int,
        default=None,
        help="ray: replicas of each index shard (default 2): a lost one costs no failed search",
    )
    sp.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for flag in ("jobs", "workers", "shards", "actors", "replicas", "shard_replicas"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            print(f"imgsearch: error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    engine = getattr(args, "engine", "embedded")
    ray_only = ("address", "actors", "replicas", "shard_replicas")
    for flag, only in (*((f, "ray") for f in ray_only), ("workers", "embedded")):
        if getattr(args, flag, None) is not None and engine != only:
            print(f"imgsearch: error: --{flag.replace('_', '-')} is for --engine {only}", file=sys.stderr)
            return 2
    try:
        command: Callable[[argparse.Namespace], int] = args.func  # the sub-command's cmd_* function
        return command(args)
    except ValidationError as e:
        msgs = "; ".join(f"IMGSEARCH_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        print(f"imgsearch: invalid settings: {msgs}", file=sys.stderr)
    except _domain_errors(args.command) as e:
        print(f"imgsearch: error: {e}", file=sys.stderr)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        # An install without an optional group of dependencies (the serving image, say).
        print(f"imgsearch: error: {args.command} needs {e.name}: pip install '.[{extra}]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
