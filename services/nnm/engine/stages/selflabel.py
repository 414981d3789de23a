"""Stage 4: self-labelling on confident pseudo-labels (with optional EMA of the weights)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..augment import Normalize, StrongAugment
from ..checkpoint import StageDir, atomic_torch_save, atomic_write_json
from ..config import RuntimeConfig, SelfLabelConfig
from ..data import ImageSet
from ..losses import selflabel_loss
from ..model_io import InputSpec
from ..progress import ProgressSink
from ..runtime import Runtime, set_lr, shuffled_batches, steps_per_epoch
from .cluster import load_cluster_model, scan_loss_of
from .common import EpochMeter, file_digest

STAGE = "selflabel"
#: Entropy weight of the label-free SCAN loss that judges self-labelling (SCAN's value).
ENTROPY_WEIGHT = 5.0


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
    (neighbors.npy of the mine stage) the summary holds the label-free SCAN loss before and after,
    and `improved` tells whether self-labelling lowered it.
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
    )
    done = stage.completed()
    if done is not None:
        return done
    model, meta = load_cluster_model(cluster_dir)
    spec = InputSpec.model_validate(meta["input"])
    model = rt.prepare(model)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    set_lr(opt, cfg.lr)
    components: dict[str, Any] = {"model": model, "optimizer": opt}
    if ema is not None:
        components["ema"] = ema
    start, state = stage.resume(components, sink)
    history: list[dict[str, Any]] = state.get("history", [])
    augment = StrongAugment(cfg.augment, spec.mean, spec.std)
    normalize = Normalize(spec.mean, spec.std)
    pool = None
    if neighbors is not None:
        pool = torch.from_numpy(np.load(neighbors)[:, 1:]).long()
        if "loss_before" not in state:
            state["loss_before"] = scan_loss_of(model, data, pool, normalize, rt, ENTROPY_WEIGHT)[0]
    n = len(data)
    steps = steps_per_epoch(n, cfg.batch_size)
    sink.stage_started(STAGE, cfg.epochs, steps)
    for epoch in range(start, cfg.epochs):
        gen = rt.generator(STAGE, epoch)
        meter = EpochMeter(sink, STAGE, epoch, cfg.epochs, steps)
        for step, idx in enumerate(shuffled_batches(n, cfg.batch_size, gen), 1):
            meter.before_step()
            x = rt.to_device(data.images[idx])
            teacher = ema if ema is not None else model
            teacher.eval()
            with torch.no_grad(), rt.autocast():
                _, weak = teacher(rt.to_model(normalize(x)))
            model.train()
            with rt.autocast():
                _, strong = model(rt.to_model(augment(x, gen)))
            loss, confident = selflabel_loss(weak[0], strong[0], cfg.threshold, cfg.class_balance)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay)
            meter.after_step(step, len(idx), {"loss": loss.item(), "confident": confident / len(idx)})
        stats = meter.summary()
        history.append(stats)
        stage.save(epoch + 1, components, {"history": history, **{k: v for k, v in state.items() if k != "history"}})
        sink.epoch_finished(STAGE, epoch + 1, stats)

    final = ema if ema is not None else model
    atomic_torch_save({k: v.detach().cpu() for k, v in final.state_dict().items()}, out / "model.pt")
    atomic_write_json(out / "meta.json", meta | {"heads": 1, "head": 0, "selflabel": True})
    summary: dict[str, Any] = {"epochs": cfg.epochs, "history": history}
    if pool is not None:
        after = scan_loss_of(final, data, pool, normalize, rt, ENTROPY_WEIGHT)[0]
        summary.update(scan_loss_before=state["loss_before"], scan_loss_after=after,
                       improved=bool(after <= state["loss_before"]))
    stage.mark_done(summary)
    sink.stage_finished(STAGE, summary)
    return summary
