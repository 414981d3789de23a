"""`nnm`: run the clustering pipeline or any of its stages from the command line.

Errors a user can fix end the program with one sentence on stderr and exit status 2; an interrupt
exits 130 and the same command resumes the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from nnm import __version__

from . import remote

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _add_common(p: argparse.ArgumentParser, dataset: bool = True, preset: bool = True, device: bool = True) -> None:
    if dataset:
        p.add_argument(
            "--dataset",
            required=True,
            help="built-in name (cifar10, cifar20, stl10, mnist5k, digits; NAME:SPLIT for a split) "
            "or a folder / .zip of images",
        )
    if preset:
        p.add_argument("--preset", default="auto",
                       help="auto (fast on a GPU, cpu otherwise), nnm, scan, fast, cpu or quick (default: auto)")
        p.add_argument("--config", type=Path, help="JSON file of settings merged over the preset")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set pretext.epochs=20 (repeatable)",
        )
        p.add_argument("--clusters", type=_clusters_arg,
                       help="number of clusters, or 'auto' to estimate it (default: number of classes)")
        p.add_argument("--min-clusters", type=int, help="with --clusters auto: fewest clusters considered (default 2)")
        p.add_argument("--max-clusters", type=int, help="with --clusters auto: most clusters considered (default 50)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    if device:
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _clusters_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of clusters or 'auto', got {text!r}") from None


def _scopes_arg(text: str) -> list[str]:
    """`--scopes a,b`: the names, blanks dropped (the key store checks them)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_key_actions(p: argparse.ArgumentParser) -> None:
    """`create`, `list` and `revoke` under `nnm keys` and `nnm remote keys`."""
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key and print it (it is shown only once)")
    k.add_argument("--name", required=True)
    k.add_argument("--scopes", default=["read", "write"], type=_scopes_arg,
                   help="comma-separated: read, write, metrics (Prometheus), admin (manage keys over HTTP)")
    k.add_argument("--max-running", type=int, help="jobs this key may run at once")
    k.add_argument("--max-queued", type=int, help="queued + running jobs this key may have")
    k.add_argument("--uploads-per-minute", type=int)
    keys.add_parser("list", help="list keys (never the keys themselves)")
    k = keys.add_parser("revoke", help="revoke a key by id")
    k.add_argument("key_id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nnm {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pipeline", help="run every stage and evaluate")
    _add_common(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (re-run to resume)")

    p = sub.add_parser("pretext", help="train a SimCLR backbone")
    _add_common(p)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("mine", help="mine nearest neighbours with a pretext backbone")
    _add_common(p)
    p.add_argument("--pretext", type=Path, required=True, help="output directory of `nnm pretext`")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("cluster", help="train clustering heads (SCAN / NNM)")
    _add_common(p)
    p.add_argument("--pretext", type=Path, required=True)
    p.add_argument("--neighbors", type=Path, required=True, help="output directory of `nnm mine`")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("selflabel", help="fine-tune a clustering model on confident pseudo-labels")
    _add_common(p)
    p.add_argument("--cluster", type=Path, required=True, help="output directory of `nnm cluster`")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("export", help="turn a cluster or selflabel directory into a model directory")
    _add_common(p, preset=False)
    p.add_argument("--from", dest="source", type=Path, required=True, help="cluster or selflabel directory")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("evaluate", help="evaluate a trained model on a (labelled) image set")
    _add_common(p, preset=False)
    p.add_argument("--model", type=Path, required=True, help="model directory or pipeline output directory")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("assign", help="print cluster and confidence of images, one JSON line each")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("config", help="print the resolved configuration of a preset as JSON")
    _add_common(p)

    p = sub.add_parser("serve", help="run the REST service (embedded: SQLite, local files, in-process workers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, help="where the embedded service keeps its data (NNM_DATA_DIR)")

    p = sub.add_parser("migrate", help="create or upgrade the job store's tables (NNM_DATABASE_URL)")
    p.add_argument("--data-dir", type=Path)

    p = sub.add_parser("keys", help="manage the service's API keys (stored hashed in the job store)")
    p.add_argument("--data-dir", type=Path)
    _add_key_actions(p)

    remote.add_parser(sub, lambda p, dataset: _add_common(p, dataset=dataset, device=False), _add_key_actions)
    return parser


def manage_keys(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["NNM_DATA_DIR"] = str(args.data_dir)
    from nnm.service.auth import KeyStore
    from nnm.service.context import ServiceContext

    ctx = ServiceContext.from_settings(migrate=True)
    store = KeyStore(ctx.jobs)
    try:
        if args.keys_command == "create":
            try:
                key, row = store.create(args.name, args.scopes, args.max_running, args.max_queued,
                                        args.uploads_per_minute)
            except ValueError as exc:
                print(f"nnm: error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR
            print(json.dumps({"id": row.id, "name": row.name, "scopes": row.scopes, "key": key}))
            print("nnm: store the key now; only its hash is kept", file=sys.stderr)
        elif args.keys_command == "list":
            for row in store.list():
                print(json.dumps({"id": row.id, "name": row.name, "scopes": row.scopes,
                                  "created_at": row.created_at.isoformat(),
                                  "revoked": row.revoked_at is not None}))
        elif not store.revoke(args.key_id):
            print(f"nnm: error: no active key '{args.key_id}'", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    finally:
        ctx.close()


def _is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is reachable from this machine only."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _open_to_anonymous() -> str | None:
    """Why anonymous callers get in with the current settings (None: an API key is required)."""
    from nnm.service.settings import load_settings

    settings = load_settings()
    if settings.auth == "required":
        return None
    if settings.auth == "off":
        return "NNM_AUTH=off"
    try:  # auto: closed for good once a key has been created (revoked ones count)
        from nnm.service.auth import KeyStore
        from nnm.service.store.repository import JobStore

        jobs = JobStore(settings.resolved_database_url)
        try:
            if KeyStore(jobs).any_ever():
                return None
        finally:
            jobs.dispose()
    except Exception:  # no job store yet (first start) or unreachable: no key is known to exist
        pass
    return "NNM_AUTH=auto and no API key exists yet"


def serve(args: argparse.Namespace) -> int:
    """Run the gateway with uvicorn; settings come from NNM_* variables."""
    if args.data_dir:
        os.environ["NNM_DATA_DIR"] = str(args.data_dir)
    import uvicorn

    if not _is_loopback(args.host):
        reason = _open_to_anonymous()
        if reason:
            print(
                f"nnm: WARNING: listening on {args.host}, beyond this machine, without API keys ({reason}): "
                "anyone who reaches the port can upload data, run jobs and read every result. Bind to "
                "127.0.0.1, or set NNM_AUTH=required and create a key with `nnm keys create --name NAME`.",
                file=sys.stderr, flush=True,
            )
    print(f"nnm: serving on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run("nnm.service.gateway.main:app", factory=True, host=args.host, port=args.port, log_level="warning")
    return 0


def migrate(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["NNM_DATA_DIR"] = str(args.data_dir)
    from nnm.service.settings import load_settings
    from nnm.service.store.migrations import upgrade

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print("nnm: database is at the newest schema", file=sys.stderr)
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from nnm.engine.config import ConfigError, apply_override, deep_merge

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file '{args.config}' ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{args.config}' must hold a JSON object")
        data = deep_merge(data, loaded)
    for item in getattr(args, "overrides", []):
        apply_override(data, item)
    if getattr(args, "clusters", None) is not None:
        apply_override(data, f"cluster.clusters={json.dumps(args.clusters)}")
    for flag, key in (("min_clusters", "estimate.min_clusters"), ("max_clusters", "estimate.max_clusters")):
        if getattr(args, flag, None) is not None:
            apply_override(data, f"{key}={getattr(args, flag)}")
    if args.seed is not None:
        apply_override(data, f"runtime.seed={args.seed}")
    if getattr(args, "device", None) is not None:
        apply_override(data, f"runtime.device={json.dumps(args.device)}")
    return data


def _sink(args: argparse.Namespace):
    from nnm.engine.progress import TqdmSink

    # Under torchrun only rank 0 shows progress (every rank trains the same steps).
    return TqdmSink(enabled=not args.quiet and os.environ.get("RANK", "0") == "0")


def _runtime(args: argparse.Namespace):
    from nnm.engine.config import RuntimeConfig

    return RuntimeConfig(seed=args.seed or 0, device=args.device or "auto")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ["evaluated_on", "acc", "nmi", "ari", "top5", "num_images", "num_clusters", "empty_clusters",
            "mean_confidence", "estimated_clusters", "train"]
    return {k: metrics[k] for k in keys if k in metrics}


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "remote":
        return remote.run(args, _overrides)

    from nnm.engine import data as data_mod
    from nnm.engine.config import DataConfig
    from nnm.engine.pipeline import resolve_config, run_pipeline

    if cmd == "serve":
        return serve(args)
    if cmd == "migrate":
        return migrate(args)
    if cmd == "keys":
        return manage_keys(args)
    if cmd == "assign":
        from nnm.engine.model_io import TrainedModel
        from nnm.engine.stages.assign import assign_images, read_image_files

        model = TrainedModel.load(args.model)
        results = assign_images(model, read_image_files(args.images), _runtime(args))
        for r in results:
            print(json.dumps({"path": r.pop("image"), **r}))
        return 0

    if cmd in {"evaluate", "export"}:
        from nnm.engine.model_io import TrainedModel

        data = data_mod.load_dataset(args.dataset, cache=DataConfig(dataset=args.dataset).cache_policy())
        if cmd == "export":
            from nnm.engine.export import export_model

            export_model(args.source, data, args.out)
            print(f"model written to {args.out}")
            return 0
        from nnm.engine.stages.evaluate import run_evaluate

        metrics = run_evaluate(
            TrainedModel.load(args.model), data, args.out, runtime_cfg=_runtime(args), sink=_sink(args)
        )
        _print(_headline(metrics))
        return 0

    overrides = _overrides(args)
    cfg = resolve_config(args.dataset, args.preset, overrides)
    if cmd == "config":
        _print(cfg.model_dump(mode="json"))
        return 0
    sink = _sink(args)
    if cmd == "pipeline":
        metrics = run_pipeline(cfg, args.out, sink)
        if metrics:  # empty on the ranks other than 0 of a torchrun: rank 0 evaluates and reports
            sink.message(f"outputs in {args.out}: metrics.json, confusion_matrix.png, prototypes.png, model/")
            _print(_headline(metrics))
        return 0

    d = cfg.data
    from nnm.engine import stages

    if cmd == "pretext":
        data = data_mod.load_dataset(d.dataset, d.pretext_split or d.split, d.image_size, d.root,
                                     cache=d.cache_policy())
        summary = stages.run_pretext(cfg.pretext, data, args.out, cfg.runtime, sink)
    else:
        data = data_mod.load_dataset(d.dataset, d.split, d.image_size, d.root, cache=d.cache_policy())
        if cmd == "mine":
            summary = stages.run_mine(cfg.mine, data, args.pretext, args.out, cfg.runtime, sink)
        elif cmd == "cluster":
            summary = stages.run_cluster(cfg.cluster, data, args.pretext, args.neighbors, args.out, cfg.runtime, sink)
        else:
            summary = stages.run_selflabel(cfg.selflabel, data, args.cluster, args.out, cfg.runtime, sink)
    summary = {k: v for k, v in summary.items() if k != "history"}
    _print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from nnm.engine.errors import NNMError
    except ImportError as exc:  # pragma: no cover - broken installation
        print(f"nnm: error: the engine cannot be imported ({exc}); reinstall the package", file=sys.stderr)
        return EXIT_INTERNAL
    try:
        return run(args)
    except NNMError as exc:
        print(f"nnm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("nnm: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("nnm: error: out of memory; use a smaller batch size or fewer images", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as exc:
        if str(exc).startswith("invalid settings"):
            print(f"nnm: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        if args.debug or os.environ.get("NNM_DEBUG"):
            raise
        print(f"nnm: internal error: ValueError: {exc} (run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL
    except OSError as exc:
        print(f"nnm: error: {exc.strerror or exc} ({exc.filename or 'I/O'})", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if args.debug or os.environ.get("NNM_DEBUG"):
            raise
        print(f"nnm: internal error: {exc.__class__.__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
