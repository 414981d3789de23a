"""Checkpoints: round trip, resume after an interruption (pretext, cluster and self-label stages),
refusal of foreign checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from nnm.engine.checkpoint import StageDir, safe_load
from nnm.engine.config import ClusterConfig, MineConfig, PretextConfig, RuntimeConfig, SelfLabelConfig
from nnm.engine.data import ImageSet, load_dataset
from nnm.engine.errors import Cancelled, CheckpointError
from nnm.engine.progress import ProgressSink
from nnm.engine.stages.cluster import run_cluster
from nnm.engine.stages.mine import run_mine
from nnm.engine.stages.pretext import run_pretext
from nnm.engine.stages.selflabel import run_selflabel

CFG = PretextConfig(backbone={"width": 8}, epochs=3, batch_size=100, lr=0.1)
RT = RuntimeConfig(seed=3)


#: Tiny networks: one thread (the `one_thread` fixture of conftest.py) is as fast, and far faster on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


class StopAfter(ProgressSink):
    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0

    def update(self, event) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.steps


def test_stage_dir_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = StageDir(tmp_path, "demo", {"a": 1})
    stage.save(4, {"model": model, "optimizer": opt}, {"history": [{"loss": 1.5}], "memory": torch.ones(2)})
    other = torch.nn.Linear(3, 2)
    epoch, state = StageDir(tmp_path, "demo", {"a": 1}).resume({"model": other, "optimizer": opt})
    assert epoch == 4 and state["history"] == [{"loss": 1.5}] and torch.equal(state["memory"], torch.ones(2))
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(CheckpointError, match=r"other settings \(differs in a\)"):
        StageDir(tmp_path, "demo", {"a": 2}).resume({"model": other})


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, small_digits):
    reference = tmp_path / "ref"
    run_pretext(CFG, small_digits, reference, RT)
    interrupted = tmp_path / "int"
    with pytest.raises(Cancelled):
        run_pretext(CFG, small_digits, interrupted, RT, StopAfter(6))  # 4 steps per epoch: stops in epoch 2
    assert safe_load(interrupted / "checkpoint.pt")["epoch"] == 1
    assert not (interrupted / "done.json").exists()
    summary = run_pretext(CFG, small_digits, interrupted, RT)
    assert len(summary["history"]) == 3
    a, b = safe_load(reference / "model.pt"), safe_load(interrupted / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (interrupted / "checkpoint.pt").exists()  # removed once the stage is done


def test_rerun_of_a_finished_stage_is_a_no_op_and_other_settings_are_refused(tmp_path, small_digits):
    out = tmp_path / "p"
    run_pretext(CFG.model_copy(update={"epochs": 1}), small_digits, out, RT)
    mtime = (out / "model.pt").stat().st_mtime_ns
    run_pretext(CFG.model_copy(update={"epochs": 1}), small_digits, out, RT)
    assert (out / "model.pt").stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match="config.epochs"):
        run_pretext(CFG.model_copy(update={"epochs": 2}), small_digits, out, RT)


def test_cli_resumes_after_kill_9(tmp_path):
    out = tmp_path / "pretext"
    cmd = [
        sys.executable,
        "-m",
        "nnm.cli.main",
        "pretext",
        "--dataset",
        "digits",
        "--preset",
        "quick",
        "--quiet",
        "--set",
        "pretext.epochs=8",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "checkpoint.pt").exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = safe_load(out / "checkpoint.pt")["epoch"]
    assert 1 <= done_before < 8
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {done_before}" in again.stderr
    assert (out / "done.json").exists() and (out / "model.pt").exists()
    # No temporary files are left behind.
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_marker_is_trusted_only_with_the_files_it_lists(tmp_path, small_digits):
    """A stage whose marker is there but whose files are missing or altered (an upload or a download
    that stopped part-way) runs again instead of being skipped; the marker goes up last and lists them."""
    cfg = CFG.model_copy(update={"epochs": 1})
    out = tmp_path / "p"
    run_pretext(cfg, small_digits, out, RT)
    reference = (out / "model.pt").read_bytes()
    (out / "model.pt").unlink()
    run_pretext(cfg, small_digits, out, RT)
    assert (out / "model.pt").exists(), "a stage whose model is missing was skipped"
    assert (out / "model.pt").read_bytes() == reference  # trained again, deterministically
    assert set(json.loads((out / "done.json").read_text())["files"]) == {"model.pt", "meta.json"}
    (out / "meta.json").write_text((out / "meta.json").read_text().replace("{", "{ ", 1))  # same file, altered
    mtime = (out / "model.pt").stat().st_mtime_ns
    run_pretext(cfg, small_digits, out, RT)
    assert (out / "model.pt").stat().st_mtime_ns != mtime  # not trusted: the stage ran again
    # A marker from before files were listed is trusted as it was.
    done = json.loads((out / "done.json").read_text())
    del done["files"]
    (out / "done.json").write_text(json.dumps(done))
    mtime = (out / "model.pt").stat().st_mtime_ns
    run_pretext(cfg, small_digits, out, RT)
    assert (out / "model.pt").stat().st_mtime_ns == mtime


def test_upload_dir_puts_the_marker_last(tmp_path):
    from nnm.service.store.storage import LocalStore, upload_dir

    for name in ("done.json", "meta.json", "model.pt", "zz/late.bin"):
        (tmp_path / "stage" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stage" / name).write_bytes(b"x")
    order: list[str] = []

    class Recording(LocalStore):
        def put_file(self, key, path):
            order.append(key.rsplit("/", 1)[-1] if "zz/" not in key else "zz/late.bin")
            return super().put_file(key, path)

    upload_dir(Recording(tmp_path / "store"), tmp_path / "stage", "jobs/j/a1/pretext")
    assert order == ["meta.json", "model.pt", "zz/late.bin", "done.json"]


# --- cluster and self-label stages ------------------------------------------------------------------

STAGE_RT = RuntimeConfig(seed=4, device="cpu", precision="fp32")
#: Random but cheap strong augmentation (the generator's state matters for resuming).
CHEAP = {"n_ops": 2, "ops": ["rotate", "translate_x", "brightness", "contrast"]}
#: 120 images in batches of 30: 4 steps per epoch; NNM with both matching terms and 2 heads.
CLUSTER_CFG = ClusterConfig(method="nnm", heads=2, epochs=3, batch_size=30, lr=1e-2, augment=CHEAP)
#: The clustering model of an untrained backbone is unsure (max probabilities near 0.11 of 10):
#: a low threshold so that self-labelling trains.
SELFLABEL_CFG = SelfLabelConfig(epochs=3, batch_size=30, threshold=0.11, augment=CHEAP)
TIMING = {"seconds", "images_per_s"}


def without_timings(history):
    return [{k: v for k, v in e.items() if k not in TIMING} for e in history]


def same_files(a, b, names=("model.pt", "meta.json")):
    for name in names:
        if name.endswith(".pt"):
            x, y = safe_load(a / name), safe_load(b / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
        else:
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Pretext (an untrained width-8 backbone), mined neighbours and an uninterrupted cluster run on 120 digits."""
    from nnm.engine.data import resize_batch

    root = tmp_path_factory.mktemp("resume-stages")
    data = load_dataset("digits")
    idx = torch.arange(120)
    data = ImageSet(resize_batch(data.images[idx], 16), data.labels[idx].clone(), data.class_names,
                    [data.names[i] for i in idx.tolist()], source="digits-120")
    run_pretext(CFG.model_copy(update={"epochs": 0}), data, root / "pretext", STAGE_RT)
    run_mine(MineConfig(topk=5, feature="backbone"), data, root / "pretext", root / "mine", STAGE_RT)
    summary = run_cluster(CLUSTER_CFG, data, root / "pretext", root / "mine", root / "cluster", STAGE_RT)
    return root, data, summary


def test_cluster_resume_after_interruption_equals_uninterrupted_run(tmp_path, clustered):
    """Stopped in epoch 2, after the global matching memory of epoch 1 was saved."""
    root, data, reference = clustered
    out = tmp_path / "cluster"
    args = (CLUSTER_CFG, data, root / "pretext", root / "mine", out, STAGE_RT)
    with pytest.raises(Cancelled):
        run_cluster(*args, StopAfter(6))
    ckpt = safe_load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["state"]["memory"].shape == (2, len(data), 10)
    summary = run_cluster(*args)
    assert without_timings(summary["history"]) == without_timings(reference["history"])
    same_files(root / "cluster", out)
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("ema", [None, 0.9])
def test_selflabel_resume_after_interruption_equals_uninterrupted_run(tmp_path, clustered, ema):
    root, data, _ = clustered
    cfg = SELFLABEL_CFG.model_copy(update={"ema_decay": ema})
    reference = run_selflabel(cfg, data, root / "cluster", tmp_path / "ref", STAGE_RT)
    assert any(e["confident"] > 0 for e in reference["history"])  # it did train on something
    out = tmp_path / "int"
    with pytest.raises(Cancelled):
        run_selflabel(cfg, data, root / "cluster", out, STAGE_RT, StopAfter(7))  # stops in epoch 2
    assert safe_load(out / "checkpoint.pt")["epoch"] == 1
    summary = run_selflabel(cfg, data, root / "cluster", out, STAGE_RT)
    assert without_timings(summary["history"]) == without_timings(reference["history"])
    same_files(tmp_path / "ref", out)
    assert not (out / "checkpoint.pt").exists()
