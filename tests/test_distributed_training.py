"""Training on several processes under torchrun (gloo on the CPU): the same gradients as one process on
the whole batch, the same loss curve, and a run that resumes on another number of processes after one
rank is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from nnm.engine.distributed import Distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
#: One thread per rank: two ranks on a 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PRETEXT = ["pretext", "--dataset", "digits", "--preset", "cpu", "--quiet", "--set", "pretext.epochs=6",
           "--set", "runtime.threads=1"]


def test_ranks_split_a_batch_and_gathering_restores_order():
    idx = torch.arange(10, 23)  # 13 rows over 3 ranks: 5, 4 and 4
    ranks = [Distributed(r, 3) for r in range(3)]
    shards = [d.shard(idx) for d in ranks]
    assert [len(s) for s in shards] == [5, 4, 4]
    ordered = ranks[0].order(idx)
    assert torch.equal(torch.cat(shards), ordered) and sorted(ordered.tolist()) == idx.tolist()
    # Each rank finds its rows inside the ordered batch (the cluster stage orders first, then shards).
    assert all(torch.equal(d.shard_of_ordered(ordered), s) for d, s in zip(ranks, shards, strict=True))
    alone = Distributed()
    assert not alone.enabled and alone.main
    assert torch.equal(alone.shard(idx), idx) and torch.equal(alone.order(idx), idx)


def test_two_ranks_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    """SimCLR's NT-Xent and the SCAN loss with batch norm synchronised over ranks (GlooSyncBatchNorm), a
    batch of 13 split 7/6: DDP's averaged gradients equal one process's on all 13 rows. And the NNM
    memory's nearest-other search, split by rows between the ranks, gathers to the whole answer (exact, and
    through an IVF index the ranks build together)."""
    out = tmp_path / "grads.json"
    proc = subprocess.run([*TORCHRUN, str(REPO / "tests" / "ddp_gradient_check.py"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    for kind in ("simclr", "scan"):
        assert found[kind]["params"] > 40
        assert found[kind]["max_abs_diff"] < 1e-4 * found[kind]["max_abs_grad"], found
    # NNM's nearest-other search split by rows between the ranks, gathered: the whole answer, in order.
    assert found["nearest_other"] == {"rows": [0, 150], "equal": True, "dtype": "torch.int64", "n": 301}, found
    assert found["nearest_other_ivf"] == {"equal": True, "n": 6000, "self": 0}, found
    # What rank 0 alone computed (a data set's traits, say), handed to both ranks; its error raised on both.
    assert found["share"] == [{"calls": 1, "got": 10, "error": "no such data set"},
                              {"calls": 0, "got": 10, "error": "no such data set"}], found
    # Rank 0's exit handlers left the gloo group (without that, shutdown could abort on gloo's threads).
    assert found["left_group_at_exit"] is True, found


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "done.json").read_text())["summary"]["history"]]


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    """The process of `rank` among torchrun's workers (its children), from their environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun.pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _checkpoint_epoch(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")["epoch"])
    except Exception:  # not there yet, or being replaced: look again
        return 0


@pytest.mark.slow
def test_two_ranks_follow_one_process_and_resume_alone_after_a_rank_is_killed(tmp_path):
    """digits, SimCLR 6 epochs: one process; then two ranks, rank 1 killed once 2 epochs are saved,
    finished by one process from that checkpoint (another world size)."""
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "nnm.cli.main", *PRETEXT, "--out", str(one)], env=ENV, check=True,
                   timeout=600, cwd=REPO)
    reference = _losses(one)

    two = tmp_path / "two"
    torchrun = subprocess.Popen([*TORCHRUN, "-m", "nnm.cli.main", *PRETEXT, "--out", str(two)], env=ENV, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while _checkpoint_epoch(two) < 2 and torchrun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    victim = _rank_pid(torchrun, 1)
    assert victim is not None and torchrun.poll() is None, "torchrun ended before two epochs were saved"
    os.kill(victim, signal.SIGKILL)
    torchrun.communicate(timeout=120)
    assert torchrun.returncode != 0 and not (two / "done.json").exists()
    saved = _checkpoint_epoch(two)
    assert 2 <= saved < 6

    # The same command on one process: it resumes after the saved epochs, whatever the world size was.
    resumed = subprocess.run([sys.executable, "-m", "nnm.cli.main", *[a for a in PRETEXT if a != "--quiet"],
                              "--out", str(two)], env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {saved}" in resumed.stderr + resumed.stdout
    losses = _losses(two)
    assert len(losses) == 6 and not (two / "checkpoint.pt").exists()
    # Two ranks draw other augmentations than one process, so the curves are close, not equal. Measured
    # on 8 epochs (AMD EPYC, 2 cores): at most 5 % apart per epoch, 2 % at the end. The bars leave room
    # for that and still fail a loss over each rank's own half batch (about log 2 = 0.7 lower).
    for got, want in zip(losses, reference, strict=True):
        assert abs(got - want) <= 0.08 * want, (losses, reference)
    assert abs(losses[-1] - reference[-1]) <= 0.05 * reference[-1], (losses, reference)


@pytest.mark.slow
def test_the_pipeline_under_torchrun_writes_once_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*TORCHRUN, "-m", "nnm.cli.main", "pipeline", "--dataset", "digits", "--preset", "quick",
                           "--out", str(out), "--set", "runtime.threads=1", "--set", "data.cache=on",
                           "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                          env=ENV, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"acc"') == 1  # one headline: rank 0's
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["acc"] <= 1 and metrics["num_images"] == 1797
    for stage in ("pretext", "mine", "cluster", "selflabel"):
        done = json.loads((out / stage / "done.json").read_text())
        assert done["stage"] == stage and not (out / stage / "checkpoint.pt").exists()
    assert (out / "model" / "model.pt").exists()
    # One complete entry per size the run asked for: 8 px (the native size, read to choose the preset)
    # and 16 px (training); rank 0 wrote the training one first, rank 1 mapped it.
    entries = sorted(json.loads(f.read_text())["shape"] for f in (tmp_path / "cache").glob("*.json"))
    assert entries == [[1797, 1, 8, 8], [1797, 1, 16, 16]], entries
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and not list((tmp_path / "cache").glob("*.part"))
