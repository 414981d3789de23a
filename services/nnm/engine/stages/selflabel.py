"""Stage 4: self-labelling on confident pseudo-labels (with optional EMA of the weights)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import Normalize, StrongAugment
from ..checkpoint import StageDir, atomic_torch_save, atomic_write_json
from ..config import RuntimeConfig, SelfLabelConfig
from ..data import ImageSet
from ..losses import selflabel_loss
from ..model_io import InputSpec, compute_outputs
from ..progress import ProgressSink
from ..runtime import Runtime, set_lr, shuffled_batches, steps_per_epoch
from .cluster import head_losses, load_cluster_model
from .common import EpochMeter, file_digest, finished, stage_end

STAGE = "selflabel"
#: Entropy weight of the label-free SCAN loss recorded before and after self-labelling (SCAN's value).
ENTROPY_WEIGHT = 5.0
#: The self-labelled model is kept unless it puts fewer mined neighbour pairs together than the
#: clustering model did (by more than this), or shrank its smallest cluster below half of what it was
#: (see `keep_selflabelled`; the study behind it is in docs/benchmarks.md).
AGREEMENT_TOLERANCE = 0.0
SMALLEST_RATIO = 0.5


@torch.no_grad()
def label_free_quality(probs: torch.Tensor, neighbors: torch.Tensor) -> dict[str, float]:
    """Label-free figures of a clustering that do not reward or punish confidence itself.

    `agreement`: share of (image, mined neighbour) pairs put in the same cluster; `balance`: entropy of
    the cluster sizes over log K (1 = equal sizes, 0 = one cluster); `smallest`: the smallest cluster's
    share times K (0 = an emptied cluster, 1 = no cluster below an equal share).
    """
    pred = probs.argmax(dim=1)
    k = probs.shape[1]
    agreement = float((pred[neighbors] == pred[:, None]).float().mean())
    share = torch.bincount(pred, minlength=k).double() / len(pred)
    nz = share[share > 0]
    balance = float(-(nz * nz.log()).sum() / np.log(k))
    return {"agreement": agreement, "balance": balance, "smallest": float(share.min() * k)}


def keep_selflabelled(before: dict[str, float], after: dict[str, float]) -> bool:
    """The label-free verdict on self-labelling, from `label_free_quality` before and after.

    Not the SCAN loss: making predictions confident is what self-labelling does, and the SCAN loss's
    -log <p_i, p_j> punishes a confident disagreement with a neighbour far more than an unsure one, so
    it rose in every measured run, helpful or not. Hard neighbour agreement and cluster sizes do not
    depend on confidence.
    """
    agreement_ok = after["agreement"] >= before["agreement"] - AGREEMENT_TOLERANCE
    sizes_ok = after["smallest"] >= SMALLEST_RATIO * before["smallest"]
    return agreement_ok and sizes_ok


def _probs(model: torch.nn.Module, data: ImageSet, normalize: Normalize, rt: Runtime) -> torch.Tensor:
    model.eval()
    # The first head's logits only: the features (2 GB at a million images) are not kept.
    logits = compute_outputs(lambda x: model(x)[1][0], data.images, normalize, rt, 512)
    return F.softmax(logits, dim=1)


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target = decay * target + (1 - decay) * source; buffers (BN statistics) are copied."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


def run_selflabel(
    cfg: SelfLabelConfig,
    data: ImageSet,
    cluster_dir: Path | str,
    out_dir: Path | str,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
    neighbors: Path | str | None = None,
) -> dict[str, Any]:
    """Fine-tune the selected head and backbone on the weak view's confident predictions.

    Writes `model.pt` (one head) and `meta.json`. A batch without confident samples contributes a
    zero loss; the per-epoch history records the confident fraction. With `neighbors`
    (neighbors.npy of the mine stage) the summary holds label-free figures before and after
    (`label_free_quality`, and the SCAN loss for the record), and `improved` is `keep_selflabelled`'s
    verdict.
    """
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    cluster_dir, out = Path(cluster_dir), Path(out_dir)
    stage = StageDir(
        out,
        STAGE,
        {
            "config": cfg.model_dump(mode="json"),
            "seed": rt.seed,
            "data": data.fingerprint(),
            "cluster": file_digest(cluster_dir / "model.pt"),
        },
        writer=rt.dist.main,
    )
    done = finished(stage, rt)
    if done is not None:
        return done
    model, meta = load_cluster_model(cluster_dir)
    spec = InputSpec.model_validate(meta["input"])
    model = rt.dist.sync_batchnorm(rt.prepare(model), rt.device)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    set_lr(opt, cfg.lr)
    components: dict[str, Any] = {"model": model, "optimizer": opt}
    if ema is not None:
        components["ema"] = ema
    start, state = stage.resume(components, sink)
    student = rt.dist.ddp(model, rt.device)
    history: list[dict[str, Any]] = state.get("history", [])
    augment = StrongAugment(cfg.augment, spec.mean, spec.std)
    normalize = Normalize(spec.mean, spec.std)
    pool = None
    if neighbors is not None:
        pool = torch.from_numpy(np.load(neighbors)[:, 1:]).long()
        if "quality_before" not in state:
            probs = _probs(model, data, normalize, rt)
            state["quality_before"] = label_free_quality(probs, pool)
            state["loss_before"] = head_losses([probs], pool, ENTROPY_WEIGHT)[0]
    n = len(data)
    steps = steps_per_epoch(n, cfg.batch_size, limit=cfg.max_steps)
    images = rt.resident(data.images)
    sink.stage_started(STAGE, cfg.epochs, steps)
    for epoch in range(start, cfg.epochs):
        gen = rt.generator(STAGE, epoch)
        views_gen = rt.rank_generator(gen, STAGE, epoch)
        meter = EpochMeter(sink, STAGE, epoch, cfg.epochs, steps, rt.sync_every)
        for step, idx in enumerate(shuffled_batches(n, cfg.batch_size, gen, limit=cfg.max_steps), 1):
            meter.before_step()
            x = rt.gather(images, rt.dist.shard(idx))
            teacher = ema if ema is not None else model
            teacher.eval()
            with torch.no_grad(), rt.autocast():
                _, weak = teacher(rt.to_model(normalize(x)))
            model.train()
            with rt.autocast():
                _, strong = student(rt.to_model(augment(x, views_gen)))
            # The whole batch's confident samples and class weights, whichever rank holds them.
            loss, confident = selflabel_loss(rt.dist.gather(weak[0]), rt.dist.gather(strong[0]), cfg.threshold,
                                             cfg.class_balance)
            opt.zero_grad(set_to_none=True)
            if confident:  # a batch without confident samples teaches nothing (no weight decay step either)
                loss.backward()
                opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay)
            meter.after_step(step, len(idx), {"loss": loss.detach(), "confident": confident / len(idx)})
        stats = meter.summary()
        history.append(stats)
        stage.save(epoch + 1, components, {"history": history, **{k: v for k, v in state.items() if k != "history"}})
        sink.epoch_finished(STAGE, epoch + 1, stats)

    final = ema if ema is not None else model
    summary: dict[str, Any] = {"epochs": cfg.epochs, "history": history}
    if not rt.dist.main:
        stage_end(rt)
        return summary
    atomic_torch_save({k: v.detach().cpu() for k, v in final.state_dict().items()}, out / "model.pt")
    atomic_write_json(out / "meta.json", meta | {"heads": 1, "head": 0, "selflabel": True})
    if pool is not None:
        probs = _probs(final, data, normalize, rt)
        quality = label_free_quality(probs, pool)
        summary.update(
            quality_before=state["quality_before"],
            quality_after=quality,
            scan_loss_before=state["loss_before"],
            scan_loss_after=head_losses([probs], pool, ENTROPY_WEIGHT)[0],
            improved=keep_selflabelled(state["quality_before"], quality),
        )
    stage.mark_done(summary)
    stage_end(rt)
    sink.stage_finished(STAGE, summary)
    return summary
