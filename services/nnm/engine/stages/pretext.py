"""Stage 1: SimCLR training of the backbone (or import of a given one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..augment import SimCLRAugment
from ..checkpoint import StageDir, import_backbone
from ..config import PretextConfig, RuntimeConfig
from ..data import ImageSet, channel_stats
from ..losses import nt_xent
from ..model_io import PretextInfo, save_pretext
from ..models import ContrastiveModel, build_backbone
from ..progress import ProgressSink
from ..runtime import Runtime, cosine_lr, set_lr, shuffled_batches, steps_per_epoch
from .common import Chunked, EpochMeter, finished, stage_end

STAGE = "pretext"


def run_pretext(
    cfg: PretextConfig,
    data: ImageSet,
    out_dir: Path | str,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
) -> dict[str, Any]:
    """Train a SimCLR backbone on `data`; write `model.pt` and `meta.json` into `out_dir`.

    With `cfg.init` the backbone starts from those weights; with `epochs=0` it is only imported.
    Re-running on the same directory resumes after the last completed epoch.
    """
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    out = Path(out_dir)
    stage = StageDir(out, STAGE, {"config": cfg.model_dump(mode="json"), "data": data.fingerprint(), "seed": rt.seed},
                     writer=rt.dist.main)
    done = finished(stage, rt)
    if done is not None:
        return done

    mean, std = channel_stats(data.images)
    rt.seed_all(STAGE, "init")
    backbone = build_backbone(cfg.backbone, data.channels)
    if cfg.init:
        import_backbone(backbone, cfg.init)
    info = PretextInfo(
        backbone=cfg.backbone,
        in_channels=data.channels,
        image_size=data.image_size,
        mean=mean,
        std=std,
        feature_dim=cfg.feature_dim if cfg.epochs else None,
    )
    if cfg.epochs == 0:
        if rt.dist.main:
            save_pretext(None, backbone, info, out)
        summary: dict[str, Any] = {"epochs": 0, "imported": cfg.init, "history": []}
        stage.mark_done(summary)
        stage_end(rt)
        sink.stage_finished(STAGE, summary)
        return summary

    model = rt.dist.sync_batchnorm(rt.prepare(ContrastiveModel(backbone, cfg.feature_dim)), rt.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    components = {"model": model, "optimizer": opt}
    start, state = stage.resume(components, sink)
    # Every rank runs its share of each batch through DDP; the loss is the whole batch's (distributed.py).
    step_model = rt.dist.ddp(Chunked(model, rt), rt.device)
    history: list[dict[str, float]] = state.get("history", [])
    augment = SimCLRAugment(cfg.augment, mean, std)
    images = rt.resident(data.images)
    n = len(data)
    steps = steps_per_epoch(n, cfg.batch_size, limit=cfg.max_steps)
    sink.stage_started(STAGE, cfg.epochs, steps)
    for epoch in range(start, cfg.epochs):
        lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs, cfg.warmup_epochs)
        set_lr(opt, lr)
        gen = rt.generator(STAGE, epoch)
        views_gen = rt.rank_generator(gen, STAGE, epoch)
        model.train()
        meter = EpochMeter(sink, STAGE, epoch, cfg.epochs, steps, rt.sync_every)
        for step, idx in enumerate(shuffled_batches(n, cfg.batch_size, gen, limit=cfg.max_steps), 1):
            meter.before_step()
            x = rt.gather(images, rt.dist.shard(idx))
            views = torch.cat([augment(x, views_gen), augment(x, views_gen)])
            with rt.autocast():
                z = step_model(rt.to_model(views))
            loss = nt_xent(rt.dist.gather(z[: len(x)]), rt.dist.gather(z[len(x) :]), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.after_step(step, len(idx), {"loss": loss.detach()})
        stats = meter.summary() | {"lr": lr}
        history.append(stats)
        stage.save(epoch + 1, components, {"history": history})
        sink.epoch_finished(STAGE, epoch + 1, stats)

    if rt.dist.main:
        save_pretext(model, model.backbone, info, out)
    summary = {"epochs": cfg.epochs, "imported": cfg.init, "history": history}
    stage.mark_done(summary)
    stage_end(rt)
    sink.stage_finished(STAGE, summary)
    return summary
