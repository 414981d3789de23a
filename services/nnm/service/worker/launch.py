"""`python -m nnm.service.worker.launch N JOB_ID ATTEMPT WORKDIR`: a job's child on N processes.

This process becomes torchrun (exec, so it keeps its pid) after asking Linux to kill it when the worker
dies; torchrun starts N ranks of `nnm.service.worker.child`, which find this pid as their parent, as a
single child finds the worker's. Rank 0 does what a single child does (fetching, progress, uploads,
the outcome); the other ranks train beside it (`execution.run_job_stages`).
"""

from __future__ import annotations

import os
import sys

from .child import die_with_parent


def main(argv: list[str]) -> None:
    processes, job_args = int(argv[0]), argv[1:]
    die_with_parent()
    os.environ["NNM_PARENT_PID"] = str(os.getpid())  # the ranks' parent once this process is torchrun
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={processes}", "-m", "nnm.service.worker.child", *job_args])


if __name__ == "__main__":
    main(sys.argv[1:])
