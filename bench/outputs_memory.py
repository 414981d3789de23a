"""Peak memory of a whole-set forward pass (`compute_outputs`, which the mine, cluster and self-label
stages run over every image) against collecting the batches and concatenating them, in the same run.

    python bench/outputs_memory.py [--rows 1000000] [--dim 512]

Each way runs in its own process (tiny 4x4 images, a fixed projection to `dim` features, so the model
costs nothing and the outputs are all the memory there is); the figure is the process's peak RSS
above what it held before the pass. Prints one JSON line per way.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(way: str, rows: int, dim: int) -> dict:
    import torch
    from nnm.engine.augment import Normalize
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.model_io import compute_outputs
    from nnm.engine.runtime import Runtime, ordered_batches

    torch.manual_seed(0)
    images = torch.randint(0, 256, (rows, 1, 4, 4), dtype=torch.uint8)
    proj = torch.randn(16, dim)
    norm, rt = Normalize([0.5], [0.25]), Runtime(RuntimeConfig(device="cpu", precision="fp32"))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ proj

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if way == "concatenate":  # what compute_outputs did before: every batch kept, then torch.cat
        out = torch.cat([fn(norm(images[sl])).float() for sl in ordered_batches(rows, 512)])
    else:
        out = compute_outputs(fn, images, norm, rt, 512)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "rows": rows, "dim": dim, "output_mb": round(out.numel() * 4 / 2**20),
            "peak_above_start_mb": round((peak - before) / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", choices=["concatenate", "compute_outputs"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.dim)))
        return 0
    for way in ("concatenate", "compute_outputs"):
        cmd = [sys.executable, __file__, "--child", way, "--rows", str(args.rows), "--dim", str(args.dim)]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
