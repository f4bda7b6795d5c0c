"""One command line for every stage: imgsearch {data,train,index,build,evaluate,serve}.

Settings come from IMGSEARCH_* variables (see the README); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from app.core.config import Settings
from common.presets import UnknownPresetError, confs

# What the optional extras of pyproject.toml install: `train` (Keras models, the evaluation's figures)
# and `ray` (the cluster engine).
EXTRAS = {"tensorflow": "train", "keras": "train", "matplotlib": "train", "ray": "ray"}


# uvicorn's supervisor kills a worker that does not answer its ping within this time (its default: 5 s).
# A worker loading a million-entry index holds the GIL in long calls; on a slow host that passed 5 s,
# and the workers were killed and started again in a loop (bench/million.py, 103 times in 12 minutes).
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
    over = {k: v for k, v in {"data": args.data, "artifacts": args.artifacts, "preset": args.preset}.items() if v}
    return Settings(**over)


def _dataset(s: Settings):
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
        import functools

        import ray

        from cluster import connect
        from cluster.indexing import embed_map_images

        dataset = _dataset(s)  # refused before connecting to a cluster when the data folder is wrong
        connect(args.address)
        engine = functools.partial(embed_map_images, actors=args.actors)
        try:
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
    from cli.stages import run_index
    from evaluation import compare
    from indexer.store import data_dir

    s = _settings(args)
    dataset = _dataset(s)
    presets = args.presets or [s.preset]
    out = args.out or data_dir(s.artifacts, dataset.root) / "evaluation"
    versions = {p: run_index(p, dataset, s.artifacts, args.jobs) for p in presets}  # builds what is missing
    md = compare.main(versions, dataset, out, baseline=args.baseline, split_name=args.split)
    print(md.read_text(encoding="utf-8"))
    print(f"written to {out}")
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

        serving.run(_settings(args), args.address, args.replicas, ready=lambda m: print(m, flush=True))
        return 0
    if args.workers is not None:
        os.environ["IMGSEARCH_WORKERS"] = str(args.workers)  # validated with the other settings
    s = _settings(args)
    logging.config.dictConfig(log_config(s.log_format))
    if s.log_format == "json":
        route_stderr_to_log()
    # Inherited by the workers: each may hold max_connections sockets.
    raise_open_files_limit(s.max_connections)
    # The workers build their app with app.main:create_app() from the environment: hand the flags down.
    for name in ("data", "artifacts", "preset"):
        if getattr(args, name):
            os.environ[f"IMGSEARCH_{name.upper()}"] = str(getattr(args, name))
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
        logging.getLogger(__name__).info("%d workers; prometheus multiprocess folder %s", s.workers, prom_dir)
    try:
        serve = dict(
            factory=True,
            host=s.host,
            port=s.port,
            workers=s.workers,
            log_config=log_config(s.log_format),
            log_level="info",
            access_log=False,  # replaced by the request log line of app.core.observability
            timeout_worker_healthcheck=WORKER_PING_TIMEOUT_S,
            # Header and body read deadlines; the class travels to spawned workers by reference and
            # reads its IMGSEARCH_* settings there.
            http=DeadlineProtocol,
            # Requests past this many connections (or running requests) in a worker are answered 503.
            limit_concurrency=s.max_connections,
        )
        if s.workers == 1:
            uvicorn.run("app.main:create_app", **serve)
        else:  # uvicorn's supervisor, but the first worker serves before the others start
            from cli.supervisor import FirstWorkerFirst

            conf = uvicorn.Config("app.main:create_app", **serve)
            with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
                FirstWorkerFirst(conf, sockets=[conf.bind_socket()]).run()
    finally:
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsearch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", type=Path, help="data folder in the course layout (env IMGSEARCH_DATA)")
        sp.add_argument("--artifacts", type=Path, help="artifacts folder (env IMGSEARCH_ARTIFACTS)")
        sp.add_argument("--preset", choices=sorted(confs), help="pipeline preset (env IMGSEARCH_PRESET)")

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
        "evaluate", help="build (if needed) and compare presets on the held-out area split: table and plots"
    )
    common(sp)
    jobs(sp)
    sp.add_argument("--presets", nargs="+", choices=sorted(confs), help="presets to compare (default: --preset)")
    sp.add_argument("--baseline", default="orb-bow", help="preset for the per-query sign test (default orb-bow)")
    sp.add_argument("--split", choices=["train", "val", "test"], default="test")
    sp.add_argument("--out", type=Path, help="output folder (default: <artifacts>/<data>/evaluation)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("serve", help="serve the HTTP API")
    common(sp)
    sp.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (env IMGSEARCH_WORKERS)")
    engine(sp)
    sp.add_argument(
        "--replicas", type=int, default=None, help="ray: ingress replicas (default: autoscaled from 1 to 4)"
    )
    sp.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for flag in ("jobs", "workers", "shards", "actors", "replicas"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            print(f"imgsearch: error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    engine = getattr(args, "engine", "embedded")
    for flag, only in (("address", "ray"), ("actors", "ray"), ("replicas", "ray"), ("workers", "embedded")):
        if getattr(args, flag, None) is not None and engine != only:
            print(f"imgsearch: error: --{flag} is for --engine {only}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
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
