"""Did self-labelling help, and what would a label-free judge have said? (labels used only to score)

    python bench/selflabel_study.py RUN_DIR [RUN_DIR ...] [--after SUBDIR]

Each RUN_DIR is an `nnm pipeline --out` directory that holds both `cluster/` and `selflabel/` (run with
`--set selflabel.guard=false`, so self-labelling is not thrown away). For the clustering model and the
self-labelled model it reports, on the clustered images: ACC/NMI/ARI (labels), and label-free
figures: the SCAN loss the old guard used, split into its consistency and entropy terms; the share of
mined neighbour pairs given the same cluster (hard agreement); the normalised entropy of the cluster
sizes; the mean confidence; and the share of images over the self-labelling threshold. One JSON line
per run and model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nnm.engine.augment import Normalize
from nnm.engine.config import PipelineConfig, RuntimeConfig
from nnm.engine.data import load_dataset
from nnm.engine.metrics import clustering_metrics
from nnm.engine.model_io import InputSpec, compute_outputs
from nnm.engine.runtime import Runtime
from nnm.engine.stages.cluster import head_losses, load_cluster_model
from nnm.engine.stages.selflabel import keep_selflabelled, label_free_quality


def figures(model, data, pool, spec, rt, threshold):
    _, logits = compute_outputs(model.eval(), data.images, Normalize(spec.mean, spec.std), rt, 512)
    probs = F.softmax(logits[0].float(), dim=1)
    consistency = head_losses([probs], pool, 0.0)[0]
    entropy = consistency - head_losses([probs], pool, 1.0)[0]
    m = clustering_metrics(probs.numpy(), data.labels.numpy(), data.class_names)
    q = label_free_quality(probs, pool)
    return {
        "acc": round(m["acc"], 4), "nmi": round(m["nmi"], 4), "ari": round(m["ari"], 4),
        "scan_loss": round(consistency - 5.0 * entropy, 4), "consistency": round(consistency, 4),
        "entropy": round(entropy, 4),
        "confident": round(float((probs.max(dim=1).values > threshold).float().mean()), 4),
    } | {k: round(v, 4) for k, v in q.items()}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--after", default="selflabel", help="the self-labelled stage directory inside each run")
    args = ap.parse_args()
    rt = Runtime(RuntimeConfig(device="cpu"))
    for run in args.runs:
        cfg = PipelineConfig.model_validate(json.loads((run / "config.json").read_text()))
        d = cfg.data
        data = load_dataset(d.dataset, d.split, d.image_size, d.root)
        pool = torch.from_numpy(np.load(run / "mine" / "neighbors.npy")[:, 1:]).long()
        rows = {}
        for stage in ("cluster", args.after):
            model, meta = load_cluster_model(run / stage)
            spec = InputSpec.model_validate(meta["input"])
            rows[stage] = figures(model, data, pool, spec, rt, cfg.selflabel.threshold)
        b, a = rows["cluster"], rows[args.after]
        print(json.dumps({
            "run": str(run), "after_dir": args.after, "seed": cfg.runtime.seed, "before": b, "after": a,
            "helped": a["acc"] > b["acc"], "old_guard_keeps": a["scan_loss"] <= b["scan_loss"],
            "new_guard_keeps": keep_selflabelled(b, a),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
