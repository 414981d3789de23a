"""Stage 3: train clustering heads with the SCAN loss or NNM's neighbour matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import Normalize, StrongAugment
from ..checkpoint import StageDir, atomic_torch_save, atomic_write_json, safe_load
from ..config import ClusterConfig, RuntimeConfig
from ..data import ImageSet, RowRange
from ..errors import CheckpointError, ConfigError, DatasetError
from ..losses import entropy, nnm_loss, scan_loss
from ..mining import nearest_index_for, nearest_other
from ..model_io import InputSpec, compute_outputs, load_pretext
from ..models import ClusteringModel, build_backbone
from ..progress import ProgressSink
from ..runtime import Runtime, set_lr, shuffled_batches, steps_per_epoch
from .common import EpochMeter, file_digest, finished, stage_end

STAGE = "cluster"


def resolve_clusters(requested: int | str | None, data: ImageSet) -> int:
    """The number of clusters: as asked, else the number of classes of a labelled set."""
    if requested == "auto":
        raise ConfigError("clusters 'auto' is estimated by `nnm pipeline` (its estimate stage); a single "
                          "cluster stage needs a number (--clusters K)")
    k = requested if requested is not None else data.num_classes
    if k is None:
        raise ConfigError("the dataset has no labels, so the number of clusters must be given "
                          "(--clusters K, or --clusters auto to estimate it)")
    if k < 2:
        raise ConfigError(f"the number of clusters must be at least 2, got {k}")
    if k > len(data):
        raise DatasetError(f"the dataset has {len(data)} images, fewer than the {k} clusters asked for")
    return k


@torch.no_grad()
def head_losses(probs: list[torch.Tensor], neighbors: torch.Tensor, entropy_weight: float) -> list[float]:
    """Label-free SCAN loss of every head over the whole set and all its mined neighbours."""
    out = []
    rows = max(1, 2**24 // max(1, neighbors.shape[1] * probs[0].shape[1]))  # bounds the gathered block
    for p in probs:
        total = 0.0
        for start in range(0, len(p), rows):
            block = p[neighbors[start : start + rows]]
            sim = (p[start : start + rows, None, :] * block).sum(dim=2).clamp_min(1e-8)
            total += float(sim.log().sum())
        consistency = -total / neighbors.numel()
        out.append(consistency - entropy_weight * float(entropy(p.mean(dim=0))))
    return out


def batch_nearest(features: torch.Tensor) -> torch.Tensor:
    """Each row's nearest other row in the batch by L2 distance."""
    f = features.detach().float()
    d = torch.cdist(f, f)
    d.fill_diagonal_(float("inf"))
    return d.argmin(dim=1)


def load_cluster_model(directory: Path) -> tuple[ClusteringModel, dict[str, Any]]:
    """The clustering model of a finished cluster stage, with only its selected head kept."""
    meta = safe_load_json(directory / "meta.json")
    spec = InputSpec.model_validate(meta["input"])
    model = ClusteringModel(build_backbone(spec.backbone, spec.in_channels), meta["clusters"], meta["heads"])
    model.load_state_dict(safe_load(directory / "model.pt"))
    model.keep_head(meta["head"])
    return model, meta


def safe_load_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read '{path}' ({exc.__class__.__name__})") from None


def run_cluster(
    cfg: ClusterConfig,
    data: ImageSet,
    pretext_dir: Path | str,
    mine_dir: Path | str,
    out_dir: Path | str,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
) -> dict[str, Any]:
    """Train `cfg.heads` cluster heads (and the backbone unless frozen); keep the lowest-loss head.

    The model of the epoch with the lowest label-free loss is written to `model.pt` with all heads,
    and `meta.json` names the selected head.
    """
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    pretext_dir, mine_dir, out = Path(pretext_dir), Path(mine_dir), Path(out_dir)
    k = resolve_clusters(cfg.clusters, data)
    stage = StageDir(
        out,
        STAGE,
        {
            "config": cfg.model_dump(mode="json"),
            "clusters": k,
            "seed": rt.seed,
            "data": data.fingerprint(),
            "pretext": file_digest(pretext_dir / "model.pt"),
            "neighbors": file_digest(mine_dir / "neighbors.npy"),
        },
        writer=rt.dist.main,
    )
    done = finished(stage, rt)
    if done is not None:
        return done

    neighbors = np.load(mine_dir / "neighbors.npy")
    if neighbors.shape[0] != len(data):
        raise DatasetError(f"the mined neighbours cover {neighbors.shape[0]} images, the dataset has {len(data)}")
    n_nb = min(cfg.neighbors or neighbors.shape[1] - 1, neighbors.shape[1] - 1)
    pool = torch.from_numpy(neighbors[:, 1 : n_nb + 1]).long()
    backbone, _, info = load_pretext(pretext_dir)
    rt.seed_all(STAGE, "init")
    model = rt.dist.sync_batchnorm(rt.prepare(ClusteringModel(backbone, k, cfg.heads)), rt.device)
    groups = [{"params": list(model.cluster_head.parameters()), "lr_scale": 1.0}]
    if cfg.update_backbone:
        groups.append({"params": list(model.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale})
    else:
        model.backbone.requires_grad_(False)
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    set_lr(opt, cfg.lr)
    components = {"model": model, "optimizer": opt}
    start, state = stage.resume(components, sink)
    step_model = rt.dist.ddp(_Step(model, rt, cfg.update_backbone), rt.device)
    history: list[dict[str, Any]] = state.get("history", [])
    memory: torch.Tensor | None = state.get("memory")
    best: dict[str, Any] = state.get("best", {"loss": float("inf")})
    best_state: dict[str, torch.Tensor] | None = state.get("best_state")

    nnm = cfg.method == "nnm"
    use_global = nnm and cfg.global_matching
    augment = StrongAugment(cfg.augment, info.mean, info.std)
    normalize = Normalize(info.mean, info.std)
    n = len(data)
    steps = steps_per_epoch(n, cfg.batch_size, limit=cfg.max_steps)
    images = rt.resident(data.images)
    nb_table = pool.to(images.device)  # neighbour ids where the images are: gathered without a host sync

    # The features only feed the global memory's search (without it they are not kept). An IVF index
    # (large sets) codes them in 8 bits, so there they are kept in float16: half the memory (1 GB at a
    # million 512-d rows), the same answers.
    half = use_global and nearest_index_for(n, cfg.global_index) == "ivf"

    def whole_set_outputs(x: torch.Tensor) -> list[torch.Tensor]:
        feats, logits = model(x)
        return [*logits, feats.half() if half else feats] if use_global else list(logits)

    def evaluate_all() -> tuple[list[float], torch.Tensor | None]:
        """Whole-set pass: per-head label-free losses and (NNM) the global matching memory."""
        model.eval()
        # Each rank computes its block of rows, then every rank has them all (the global memory included).
        lo, hi = rt.dist.rows(n)
        outputs = compute_outputs(whole_set_outputs, RowRange(data.images, lo, hi), normalize, rt,
                                  max(256, cfg.batch_size))
        outputs = [rt.dist.gather_rows(o) for o in outputs]
        feats = outputs.pop() if use_global else None  # the rest are the heads' logits
        probs = [F.softmax(lg, dim=1) for lg in outputs]
        del outputs
        losses = head_losses(probs, pool, cfg.entropy_weight)
        mem = None
        if use_global:
            # The search costs N^2 d (exact): each rank answers its own block of rows against all (an
            # IVF index the ranks build together, each encoding its block).
            block = nearest_other(feats, rt.device, index=cfg.global_index, ranks=rt.dist)
            nearest = rt.dist.gather_rows(torch.from_numpy(block))
            mem = torch.stack([p[nearest] for p in probs])
        return losses, mem

    # NNM computes the global matching memory after each epoch for the next one, so its first epoch has
    # no global term. Here the first epoch already has one, from the starting model: measured, it matters
    # (digits, seed 0: ACC 0.976 with it, 0.802 without; docs/fidelity.md). Saved with every checkpoint.
    if use_global and memory is None:
        _, memory = evaluate_all()
    sink.stage_started(STAGE, cfg.epochs, steps)
    for epoch in range(start, cfg.epochs):
        gen = rt.generator(STAGE, epoch)
        views_gen = rt.rank_generator(gen, STAGE, epoch)
        model.train()
        if not cfg.update_backbone:
            model.backbone.eval()
        meter = EpochMeter(sink, STAGE, epoch, cfg.epochs, steps, rt.sync_every)
        mem_table = memory.to(images.device) if use_global and memory is not None else None
        for step, idx in enumerate(shuffled_batches(n, cfg.batch_size, gen, limit=cfg.max_steps), 1):
            meter.before_step()
            b = len(idx)
            pick = torch.randint(n_nb, (b,), generator=gen, device=gen.device)
            # With several ranks each takes its share of the batch and the outputs come back gathered,
            # in `order`: the batch's indices are put in that order here.
            idx, pick = rt.dist.order(idx), rt.dist.order(pick)
            at = idx.to(nb_table.device, non_blocking=True)
            nb_idx = nb_table[at, pick.to(nb_table.device)]
            mine_at, mine_nb = rt.dist.shard_of_ordered(at), rt.dist.shard_of_ordered(nb_idx)
            xa, xn = rt.gather(images, mine_at), rt.gather(images, mine_nb)
            views = [augment(xa, views_gen), augment(xn, views_gen)] + ([augment(xa, views_gen)] if nnm else [])
            inputs = rt.to_model(torch.cat(views))
            with rt.autocast():
                feats, logits = step_model(inputs)
            if rt.dist.enabled:
                feats, logits = _gather_views(rt, feats, logits, len(xa), 3 if nnm else 2)
            batch_nb = batch_nearest(feats[:b]) if nnm and cfg.local_matching else None
            total = torch.zeros((), device=rt.device)
            parts: dict[str, torch.Tensor] = {}
            for h, lg in enumerate(logits):
                if nnm:
                    mem = mem_table[h][at].to(rt.device) if mem_table is not None else None
                    terms = nnm_loss(
                        lg[:b], lg[b : 2 * b], lg[2 * b :], batch_nb, mem, cfg.entropy_weight, cfg.cluster_temperature
                    )
                else:
                    terms = scan_loss(lg[:b], lg[b : 2 * b], cfg.entropy_weight)
                total = total + terms["total"]
                for key, value in terms.items():
                    parts[key] = parts.get(key, 0.0) + value.detach() / len(logits)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            parts.pop("total", None)
            meter.after_step(step, b, {"loss": total.detach() / len(logits), **parts})
        stats: dict[str, Any] = meter.summary()
        losses, new_memory = evaluate_all()
        if use_global:
            memory = new_memory
        stats["head_losses"] = losses
        head = int(np.argmin(losses))
        if losses[head] < best["loss"]:
            best = {"loss": losses[head], "epoch": epoch + 1, "head": head, "head_losses": losses}
            best_state = {k_: v.detach().cpu().clone() for k_, v in model.state_dict().items()}
        history.append(stats)
        state = {"history": history, "best": best, "best_state": best_state}
        if memory is not None:
            state["memory"] = memory
        stage.save(epoch + 1, components, state)
        sink.epoch_finished(STAGE, epoch + 1, stats)

    assert best_state is not None
    if not rt.dist.main:
        stage_end(rt)
        return {"epochs": cfg.epochs, "clusters": k, "method": cfg.method, "head": best["head"],
                "best_epoch": best["epoch"], "head_losses": best["head_losses"], "history": history}
    atomic_torch_save(best_state, out / "model.pt")
    spec = InputSpec(
        backbone=info.backbone, in_channels=info.in_channels, image_size=info.image_size, mean=info.mean, std=info.std
    )
    meta = {
        "input": spec.model_dump(mode="json"),
        "clusters": k,
        "heads": cfg.heads,
        "method": cfg.method,
        "head": best["head"],
        "best_epoch": best["epoch"],
        "head_losses": best["head_losses"],
    }
    atomic_write_json(out / "meta.json", meta)
    summary = {
        "epochs": cfg.epochs,
        "clusters": k,
        "method": cfg.method,
        "head": best["head"],
        "best_epoch": best["epoch"],
        "head_losses": best["head_losses"],
        "history": history,
    }
    stage.mark_done(summary)
    stage_end(rt)
    sink.stage_finished(STAGE, summary)
    return summary


class _Step(torch.nn.Module):
    """One training step's forward pass (backbone over micro-batches, then every head), as one module
    so that DDP wraps all of it. Without `update_backbone` the backbone runs without gradients."""

    def __init__(self, model: ClusteringModel, rt: Runtime, update_backbone: bool):
        super().__init__()
        self.model, self.rt, self.update_backbone = model, rt, update_backbone

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.set_grad_enabled(self.update_backbone and torch.is_grad_enabled()):
            feats = self.rt.forward_chunked(self.model.backbone, inputs)
        return feats, self.model.forward_features(feats)


def _gather_views(
    rt: Runtime, feats: torch.Tensor, logits: list[torch.Tensor], b: int, views: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each view's rows from every rank: (anchor of all ranks, neighbour of all ranks[, augmented ...])."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([rt.dist.gather(t[v * b : (v + 1) * b]) for v in range(views)])

    return whole(feats), [whole(lg) for lg in logits]
