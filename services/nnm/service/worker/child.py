"""Entry point of a job's child process: `python -m nnm.service.worker.child JOB_ID ATTEMPT WORKDIR`.

Training runs in a child of the worker task (not inside Celery's prefork process), so DataLoader
workers and torch multiprocessing work and a cancelled or stuck job can be killed as a process
group. WORKDIR is the job's directory on this machine (the dataset and backbone it downloads, kept
between attempts because their paths are part of the stages' fingerprints); the attempt writes its
outputs and its outcome (`result.json`) in `WORKDIR/a{ATTEMPT}`, a directory of its own. The exit
status says which kind of outcome it is.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_LOST = 0, 2, 3, 4


def attempt_dir(workdir: Path, attempt: int) -> Path:
    """The directory of one attempt inside the job's work directory: no other attempt writes there."""
    return workdir / f"a{attempt}"


def _write_result(workdir: Path, attempt: int, result: dict) -> None:
    from nnm.engine.checkpoint import atomic_write_json

    if os.environ.get("RANK", "0") != "0":  # one of several ranks (worker/launch.py): rank 0 reports
        return
    atomic_write_json(attempt_dir(workdir, attempt) / "result.json", result)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the worker that started it dies (no orphaned training)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    expected = os.environ.get("NNM_PARENT_PID")
    if expected and os.getppid() != int(expected):  # the worker died before we got here
        sys.exit(EXIT_LOST)


def main(argv: list[str]) -> int:
    job_id, attempt, workdir = argv[0], int(argv[1]), Path(argv[2])
    die_with_parent()
    from ..logs import JOB_ID, configure_logging
    from ..settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, "child")
    JOB_ID.set(job_id)  # this process runs one job: every record carries its id
    logging.info("child %d starts attempt %d of job %s", os.getpid(), attempt, job_id)
    # SIGTERM (cancel after the grace period, or worker shutdown) ends the process like Ctrl-C would.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    from nnm.engine.errors import Cancelled, NNMError

    from ..context import ServiceContext
    from ..jobspec import SpecError
    from ..store.storage import StorageError
    from .execution import JobLost, run_job_stages

    ctx = ServiceContext.from_settings()
    try:
        job = ctx.jobs.get_job(job_id)
        if job is None or job.attempt != attempt:
            return EXIT_LOST
        result = run_job_stages(ctx, job, attempt, workdir)
        _write_result(workdir, attempt, {"status": "succeeded", **result})
        return EXIT_OK
    except (Cancelled, KeyboardInterrupt):
        _write_result(workdir, attempt, {"status": "cancelled"})
        return EXIT_CANCELLED
    except JobLost:
        return EXIT_LOST
    except (NNMError, SpecError) as exc:
        kind = getattr(exc, "kind", "invalid-input")
        _write_result(
            workdir,
            attempt,
            {
                "status": "failed",
                "error": {"type": f"urn:nnm:problem:{kind}", "title": "Job failed", "status": 422, "detail": str(exc)},
            },
        )
        return EXIT_FAILED
    except StorageError as exc:
        _write_result(
            workdir,
            attempt,
            {
                "status": "failed",
                "retry": True,
                "error": {
                    "type": "urn:nnm:problem:storage-unavailable",
                    "title": "Artifact store unavailable",
                    "status": 503,
                    "detail": str(exc),
                },
            },
        )
        return EXIT_FAILED
    except Exception as exc:
        logging.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        _write_result(
            workdir,
            attempt,
            {
                "status": "failed",
                "error": {
                    "type": "urn:nnm:problem:internal",
                    "title": "Internal error",
                    "status": 500,
                    "detail": f"the job stopped with an internal error ({exc.__class__.__name__})",
                },
            },
        )
        return EXIT_FAILED
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
