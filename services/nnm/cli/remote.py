"""`nnm remote ...`: drive a running nnm service over its REST API (upload, submit, watch, list, cancel,
download, assign, manage keys).

The service is `--url` or NNM_URL (default http://127.0.0.1:8000); the API key is NNM_API_KEY (an
environment variable, not an option, so that it stays out of shell history and `ps`). Results are
printed as JSON on stdout, progress bars and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

EXIT_USER_ERROR = 2
#: `watch` (and `submit --watch`) exit with the job's outcome.
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4
DEFAULT_URL = "http://127.0.0.1:8000"
#: Images per assign request (the service takes at most 512 by default).
ASSIGN_CHUNK = 256
#: Formats that are compressed already: stored in the upload zip as they are.
COMPRESSED = {".jpg", ".jpeg", ".png", ".webp", ".gif"}


class RemoteError(Exception):
    """A problem the user can fix (one sentence, exit status 2)."""


def add_parser(sub: Any, add_common: Any, add_key_actions: Any) -> None:
    """Add `nnm remote` and its actions to the CLI's subparsers; `add_common` adds the preset options,
    `add_key_actions` the actions of `keys` (the same as the local `nnm keys`)."""
    p = sub.add_parser("remote", help="drive a running service over HTTP (NNM_URL, NNM_API_KEY)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("NNM_URL", DEFAULT_URL),
                   help=f"the service's base URL (default: NNM_URL or {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one HTTP request may take (default 300)")
    actions = p.add_subparsers(dest="remote_command", required=True, metavar="ACTION")

    a = actions.add_parser("upload", help="upload a folder or .zip of images as a dataset; prints the dataset")
    a.add_argument("path", type=Path)
    a.add_argument("--name", help="the dataset's name (default: the folder's or file's name)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    a = actions.add_parser("datasets", help="list datasets, newest first (JSON lines)")
    a.add_argument("--limit", type=int, default=50)

    a = actions.add_parser("submit", help="submit a job; prints it (or, with --watch, waits for its outcome)")
    a.add_argument("--type", default="pipeline",
                   choices=["pipeline", "pretext", "mine", "cluster", "selflabel", "evaluate"])
    a.add_argument("--dataset", required=True,
                   help="a dataset id, or a local folder / .zip (uploaded first), or builtin:NAME[:SPLIT]")
    add_common(a, dataset=False)
    for flag in ("pretext-job", "mine-job", "cluster-job", "model"):
        a.add_argument(f"--{flag}", help=f"input: the {flag.replace('-', ' ')} id this job builds on")
    a.add_argument("--watch", action="store_true", help="wait for the job and exit with its outcome")

    a = actions.add_parser("watch", help="follow a job until it ends; exit 0 succeeded, 3 failed, 4 cancelled")
    a.add_argument("job_id")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--poll", type=float, default=2.0, help="seconds between looks (default 2)")

    a = actions.add_parser("jobs", help="list jobs, newest first (JSON lines)")
    a.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelling", "cancelled"])
    a.add_argument("--limit", type=int, default=50)

    a = actions.add_parser("job", help="print one job")
    a.add_argument("job_id")

    a = actions.add_parser("cancel", help="cancel a job")
    a.add_argument("job_id")

    a = actions.add_parser("download", help="download a job's artifacts into a folder")
    a.add_argument("job_id")
    a.add_argument("--out", type=Path, required=True, help="folder to write into (created if missing)")
    a.add_argument("--only", action="append", default=[], metavar="NAME", help="just this artifact (repeatable)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    a = actions.add_parser("assign", help="assign images to a model's clusters (one JSON line each)")
    a.add_argument("model_id")
    a.add_argument("images", nargs="+", type=Path)

    a = actions.add_parser("keys", help="manage API keys (needs a key with the admin scope)")
    add_key_actions(a)

def run(args: argparse.Namespace, overrides: Any) -> int:
    """Run one `nnm remote` action; `overrides(args)` turns the preset options into job params."""
    import httpx

    from nnm.service.client import ApiError, Client

    client = Client(args.url.rstrip("/"), os.environ.get("NNM_API_KEY") or None, timeout=args.timeout)
    try:
        return _ACTIONS[args.remote_command](client, args, overrides)
    except ApiError as exc:
        problem = exc.problem
        hint = " (set NNM_API_KEY)" if exc.status == 401 and not os.environ.get("NNM_API_KEY") else ""
        print(f"nnm: error: the service answered {exc.status}: {problem.get('detail') or problem.get('title')}{hint}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except httpx.TransportError as exc:
        print(f"nnm: error: cannot reach the service at {args.url} ({exc.__class__.__name__}: {exc})",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except RemoteError as exc:
        print(f"nnm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        client.close()


def _emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def _bar(quiet: bool, **kwargs: Any):
    from tqdm import tqdm

    return tqdm(disable=quiet, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _image_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield path


def zip_folder(folder: Path, dest: Path) -> int:
    """Write the files of `folder` (hidden ones left out) into zip `dest` with their relative paths, so
    that class folders and train/ and test/ splits survive; returns the number of files."""
    count = 0
    with zipfile.ZipFile(dest, "w") as zf:
        for path in _image_files(folder):
            method = zipfile.ZIP_STORED if path.suffix.lower() in COMPRESSED else zipfile.ZIP_DEFLATED
            zf.write(path, PurePosixPath(*path.relative_to(folder).parts).as_posix(), compress_type=method)
            count += 1
    if count == 0:
        raise RemoteError(f"'{folder}' holds no files to upload")
    return count


def upload(client: Any, path: Path, name: str | None, quiet: bool) -> dict[str, Any]:
    """Upload a folder (zipped into a temporary file first) or a .zip; returns the dataset."""
    if not path.exists():
        raise RemoteError(f"'{path}' does not exist")
    name = name or path.resolve().name.removesuffix(".zip")
    with tempfile.TemporaryDirectory(prefix="nnm-upload-") as tmp:
        if path.is_dir():
            archive = Path(tmp) / f"{name}.zip"
            count = zip_folder(path, archive)
            if not quiet:
                print(f"nnm: zipped {count} files of '{path}'", file=sys.stderr)
        elif zipfile.is_zipfile(path):
            archive = path
        else:
            raise RemoteError(f"'{path}' is neither a folder nor a .zip file")
        with _bar(quiet, total=archive.stat().st_size, unit="B", unit_scale=True, desc="upload") as bar:
            return client.upload_dataset(archive, name, on_bytes=bar.update)


def _datasets(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    for item in client.datasets(args.limit):
        _emit(item)
    return 0


def _upload(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    _emit(upload(client, args.path, args.name, args.quiet))
    return 0


def _dataset_id(client: Any, spec: str, quiet: bool) -> str:
    if spec.startswith("builtin:"):
        name, _, split = spec.removeprefix("builtin:").partition(":")
        return client.builtin_dataset(name, split or None)["id"]
    path = Path(spec)
    if path.exists():
        return upload(client, path, None, quiet)["id"]
    return spec


def _submit(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    params = {"preset": args.preset, **overrides(args)}
    inputs = {key: getattr(args, attr) for key, attr in (
        ("pretext_job_id", "pretext_job"), ("mine_job_id", "mine_job"), ("cluster_job_id", "cluster_job"),
        ("model_id", "model")) if getattr(args, attr)}
    dataset_id = _dataset_id(client, args.dataset, args.quiet)
    # One key per invocation: a retried POST (a lost answer) cannot queue the job twice.
    job = client.submit(args.type, dataset_id, params, inputs, idempotency_key=str(uuid.uuid4()))
    if not args.watch:
        _emit(job)
        return 0
    print(f"nnm: job {job['id']} queued", file=sys.stderr)
    return watch(client, job["id"], args.quiet, 2.0)


def overall_fraction(job: dict[str, Any]) -> float:
    """How much of the whole job is done: finished stages plus the running stage's fraction."""
    if job["status"] == "succeeded":
        return 1.0
    stages = job.get("stages") or []
    current = (job.get("progress") or {}).get("fraction") or 0.0
    if not stages:
        return min(1.0, current)
    done = sum(s["status"] == "succeeded" for s in stages)
    running = any(s["status"] == "running" for s in stages)
    return min(1.0, (done + (current if running else 0.0)) / len(stages))


def watch(client: Any, job_id: str, quiet: bool, poll_s: float) -> int:
    """Follow a job with a progress bar until it ends; print it, and exit with its outcome."""
    layout = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"
    with _bar(quiet, total=1000, desc="queued", bar_format=layout) as bar:
        def draw(job: dict[str, Any]) -> None:
            progress = job.get("progress") or {}
            stage = job.get("stage") or progress.get("stage")
            bar.set_description_str(f"{stage} ({job['status']})" if stage else job["status"], refresh=False)
            bar.n = round(1000 * overall_fraction(job))
            if progress.get("epoch") is not None:
                post = f"epoch {progress['epoch']}/{progress.get('epochs')}"
                if progress.get("loss") is not None:
                    post += f" loss {progress['loss']:.3f}"
                bar.set_postfix_str(post, refresh=False)
            bar.refresh()

        # No deadline: a watch lasts as long as the job; a service briefly unavailable (503) is waited out.
        job = client.wait(job_id, timeout=float("inf"), poll_s=poll_s, on_update=draw)
    _emit(job)
    if job["status"] == "succeeded":
        return 0
    if job["status"] == "failed":
        print(f"nnm: job {job_id} failed: {(job.get('error') or {}).get('detail')}", file=sys.stderr)
        return EXIT_JOB_FAILED
    print(f"nnm: job {job_id} was cancelled", file=sys.stderr)
    return EXIT_JOB_CANCELLED


def _watch(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    return watch(client, args.job_id, args.quiet, args.poll)


def _jobs(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    for job in client.jobs(args.limit, args.status):
        _emit(job)
    return 0


def _job(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    _emit(client.job(args.job_id))
    return 0


def _cancel(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    _emit(client.cancel(args.job_id))
    return 0


def safe_target(out: Path, name: str) -> Path:
    """Where artifact `name` goes under `out`; refuses names that would leave it (a hostile server)."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or "\\" in name or any(p in {"..", "."} for p in parts):
        raise RemoteError(f"the service named an artifact '{name}', which is not a relative path")
    return out.joinpath(*parts)


def _download(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    artifacts = client.job(args.job_id)["artifacts"]
    wanted = set(args.only)
    missing = wanted - {a["name"] for a in artifacts}
    if missing:
        raise RemoteError(f"job {args.job_id} has no artifact(s) {sorted(missing)}")
    chosen = [a for a in artifacts if not wanted or a["name"] in wanted]
    targets = [(a, safe_target(args.out, a["name"])) for a in chosen]
    total = sum(a["size"] for a in chosen)
    with _bar(args.quiet, total=total, unit="B", unit_scale=True, desc="download") as bar:
        for art, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            bar.update(client.download(args.job_id, art["name"], target))
            _emit({"name": art["name"], "path": str(target), "size": art["size"]})
    return 0


def _assign(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    for start in range(0, len(args.images), ASSIGN_CHUNK):
        chunk = args.images[start:start + ASSIGN_CHUNK]
        try:
            files = [(p.name, p.read_bytes()) for p in chunk]
        except OSError as exc:
            raise RemoteError(f"cannot read '{exc.filename}' ({exc.strerror})") from None
        for path, result in zip(chunk, client.assign(args.model_id, files), strict=True):
            _emit({"path": str(path), **{k: v for k, v in result.items() if k != "filename"}})
    return 0


def _keys(client: Any, args: argparse.Namespace, overrides: Any) -> int:
    if args.keys_command == "create":
        _emit(client.create_key(args.name, args.scopes, max_running_jobs=args.max_running,
                                max_queued_jobs=args.max_queued, uploads_per_minute=args.uploads_per_minute))
        print("nnm: store the key now; only its hash is kept", file=sys.stderr)
    elif args.keys_command == "list":
        for key in client.list_keys():
            _emit(key)
    else:
        client.revoke_key(args.key_id)
    return 0


_ACTIONS = {"upload": _upload, "datasets": _datasets, "submit": _submit, "watch": _watch, "jobs": _jobs,
            "job": _job, "cancel": _cancel, "download": _download, "assign": _assign, "keys": _keys}
