"""Time one SimCLR training step on the CPU, split into augmentation and model step.

    .venv/bin/python bench/simclr_step.py [--batch 512] [--width 16] [--crops 24 32]

Random uint8 CIFAR-sized batches (the cost does not depend on the content); the w16 ResNet-18 and the
runtime (bf16 autocast where the CPU has it) the `cpu` preset uses. Prints seconds per batch and
augmented views per second. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from nnm.engine.augment import SimCLRAugment
from nnm.engine.config import BackboneConfig, RuntimeConfig, SimCLRAugmentConfig
from nnm.engine.losses import nt_xent
from nnm.engine.models import ContrastiveModel, build_backbone
from nnm.engine.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--crops", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--steps", type=int, default=4, help="timed steps, after 2 warm-up steps")
    args = ap.parse_args()
    rt = Runtime(RuntimeConfig(device="cpu"))
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    for crop in args.crops:
        augment = SimCLRAugment(SimCLRAugmentConfig(crop_size=crop), (0.5,) * 3, (0.25,) * 3)
        model = rt.prepare(ContrastiveModel(build_backbone(BackboneConfig(width=args.width), 3), 128))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        aug_s = step_s = 0.0
        for i in range(2 + args.steps):
            t0 = time.perf_counter()
            views = torch.cat([augment(x, gen), augment(x, gen)])
            t1 = time.perf_counter()
            with rt.autocast():
                z = rt.forward_chunked(model, rt.to_model(views))
            loss = nt_xent(z[: args.batch], z[args.batch :], 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
            if i >= 2:
                aug_s += t1 - t0
                step_s += time.perf_counter() - t1
        aug_s, step_s = aug_s / args.steps, step_s / args.steps
        print(f"crop {crop}px: augmentation {aug_s:.3f} s/batch, model step {step_s:.3f} s/batch, "
              f"{2 * args.batch / (aug_s + step_s):.0f} views/s", flush=True)


if __name__ == "__main__":
    main()
