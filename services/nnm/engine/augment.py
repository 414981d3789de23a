"""Batched augmentation with independent random parameters for every image.

`torchvision.transforms.v2` transforms draw one set of parameters per call, so applied to a batch
every image would get the same crop and jitter. Here crops, flips, rotations and shears are
per-sample affine grids (`grid_sample`), colour changes are per-sample factor tensors, and the
per-image torchvision.v2 kernels (equalize, autocontrast) run on the images that drew them. The same
code runs on CPU and GPU: move the uint8 batch to the device first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .config import SimCLRAugmentConfig, StrongAugmentConfig

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _bernoulli(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


class Normalize:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] and standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise a float batch already in [0, 1]."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.standardise(to_unit_float(images))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (float input is returned as is)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch, shape (B, 1, H, W); single-channel input is returned unchanged."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def warp(x: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Sample each image through its own 2x3 affine matrix (normalised coordinates)."""
    b, c, h, w = x.shape
    out = (b, c, size or h, size or w)
    grid = F.affine_grid(theta, list(out), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_flip_rotate_theta(
    n: int,
    cfg: SimCLRAugmentConfig,
    gen: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Affine matrices of RandomResizedCrop (+ flip and rotation) drawn per image."""
    lo, hi = cfg.crop_scale
    area = _uniform(n, lo, hi, gen, device)
    log_r = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen, device)
    ratio = torch.exp(log_r)
    cw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - cw)
    cy = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - ch)
    flip = torch.ones(n, device=device)
    if cfg.flip:
        flip = torch.where(_bernoulli(n, 0.5, gen, device), -1.0, 1.0)
    angle = _uniform(n, -1, 1, gen, device) * math.radians(cfg.rotate_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = cw * flip * cos
    theta[:, 0, 1] = -cw * sin
    theta[:, 1, 0] = ch * flip * sin
    theta[:, 1, 1] = ch * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Batched RGB -> HSV, all channels in [0, 1]."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Batched HSV -> RGB, all channels in [0, 1].

    Closed form: channel c (n = 5, 3, 1 for R, G, B) is v - v * s * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, the same function as the six-sector formula without per-sector selects.
    """
    h, s, v = x.unbind(dim=1)
    h6 = h * 6.0
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _col(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_col(f) * x + (1 - _col(f)) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (_col(f) * x + (1 - _col(f)) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


def adjust_sharpness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image; border pixels stay as they are (as in PIL)."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(c, 1, 3, 3)
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return (blurred + _col(f) * (x - blurred)).clamp_(0, 1)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _col(threshold), 1.0 - x, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = _col(torch.pow(2.0, 8 - bits.float()))
    return torch.floor(x * 255.0 / step) * step / 255.0


def per_image_order(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random permutation of `range(k)` for each of `n` images, shape (n, k), without host syncs.

    Row i lists the operations of image i in the order they are applied (argsort of uniform noise gives
    uniformly random permutations).
    """
    return torch.rand(n, k, generator=gen, device=device).argsort(dim=1)


def _blend_step(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Apply, per image, brightness (op 0), contrast (op 1) or saturation (op 2) with that image's factor.

    All three are `clamp(f * x + (1 - f) * ref)` with ref = 0, the mean luma, or the pixel's luma, i.e. the
    same arithmetic as `adjust_brightness` / `adjust_contrast` / `adjust_saturation`. Images whose op is
    anything else (hue, or jitter not applied) get factor 1, which is an exact identity for x in [0, 1].
    `factors` has shape (n, 3): the brightness, contrast and saturation factor of each image.
    """
    f = torch.where(
        op < 3, factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1), torch.ones_like(op, dtype=x.dtype)
    )
    gray = grayscale(x)
    contrast_mean = torch.where(op == 1, gray.mean(dim=(1, 2, 3)), torch.zeros_like(f))
    # 0, the image's mean luma or the pixel's luma: each is exact (one term is 0 * finite luma).
    ref = gray * _col((op == 2).to(x.dtype)) + _col(contrast_mean)
    return (x * _col(f)).add_(ref.mul_(_col(1 - f))).clamp_(0, 1)


class SimCLRAugment:
    """SimCLR's two-view augmentation: resized crop, flip, colour jitter, grayscale.

    As torchvision's `ColorJitter` applied image by image, every image draws its own factors and its own
    order of the four jitter operations (brightness, contrast, saturation, hue).
    """

    def __init__(self, cfg: SimCLRAugmentConfig, mean: Sequence[float], std: Sequence[float]):
        self.cfg = cfg
        self.norm = Normalize(mean, std)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg, dev = self.cfg, images.device
        x = to_unit_float(images)
        n = x.shape[0]
        x = warp(x, crop_flip_rotate_theta(n, cfg, gen, dev), cfg.crop_size)
        x = self._jitter(x, gen)
        if x.shape[1] == 3 and cfg.grayscale_p > 0:
            gray = _bernoulli(n, cfg.grayscale_p, gen, dev).view(-1, 1, 1, 1)
            x = torch.where(gray, grayscale(x).expand_as(x), x)
        return self.norm.standardise(x)

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """ColorJitter with probability `jitter_p`, in a random order drawn for every image."""
        cfg, dev, n = self.cfg, x.device, x.shape[0]
        bs, cs, ss, hs = cfg.jitter
        if cfg.jitter_p == 0 or not any(cfg.jitter):
            return x
        apply = _bernoulli(n, cfg.jitter_p, gen, dev)
        one = torch.ones(n, device=dev)
        blend = torch.stack(
            [
                torch.where(apply, _uniform(n, max(0.0, 1 - bs), 1 + bs, gen, dev), one),
                torch.where(apply, _uniform(n, max(0.0, 1 - cs), 1 + cs, gen, dev), one),
                torch.where(apply, _uniform(n, max(0.0, 1 - ss), 1 + ss, gen, dev), one),
            ],
            dim=1,
        )
        if x.shape[1] == 1:
            blend[:, 2] = 1.0  # saturation is undefined (and a no-op) on one channel
        shift = _uniform(n, -hs, hs, gen, dev)
        # order[i, pos] is the op (0 brightness, 1 contrast, 2 saturation, 3 hue) image i applies at pos.
        order = per_image_order(n, 4, gen, dev)
        if not (hs > 0 and x.shape[1] == 3):
            for pos in range(4):
                x = _blend_step(x, order[:, pos], blend)
            return x
        # Hue needs an HSV round trip, so it runs once for the whole batch: first every image's ops that
        # come before its hue, then hue (images without jitter keep their pixels), then the ops after it.
        hue_pos = (order == 3).int().argmax(dim=1)
        none = torch.full_like(order[:, 0], 3)
        for pos in range(3):
            x = _blend_step(x, torch.where(hue_pos > pos, order[:, pos], none), blend)
        x = torch.where(_col(apply), adjust_hue(x, shift), x)
        for pos in range(1, 4):
            x = _blend_step(x, torch.where(hue_pos < pos, order[:, pos], none), blend)
        return x


class StrongAugment:
    """SCAN's strong augmentation: flip, `n_ops` random ops at random strength, then Cutout.

    Each of the `n_ops` slots picks, for every image independently, an op uniformly (with replacement)
    from `cfg.ops` and a strength u ~ U(0, 1). At `magnitude` 1 the parameter ranges are SCAN's:

    ===========================  ==========================================================
    rotate                       angle in [-30, 30] degrees
    shear_x, shear_y             shear factor in [-0.1, 0.1] (about the top-left corner, as PIL;
                                 the maximum is `cfg.shear`)
    translate_x, translate_y     shift in [-0.1, 0.1] of the image side (maximum `cfg.translate`)
    color, contrast,             enhancement factor in [0.05, 0.95] (they only ever weaken the
    brightness, sharpness        image, never enhance it)
    solarize                     threshold in [0, 256] on 0..255 pixels (inverts pixels >= it)
    posterize                    int(U[4, 8]) bits, i.e. 4..7
    identity, autocontrast,      no parameter
    equalize
    ===========================  ==========================================================

    `magnitude` (0..1) scales every parameter's distance from that op's identity: angle, shear and
    shift are sign * magnitude * u * max; an enhancement factor is 1 - magnitude * (1 - U[0.05, 0.95]);
    the solarize threshold is 256 * (1 - magnitude * u); posterize keeps int(8 - magnitude * (8 - U[4, 8]))
    bits. Magnitude 0 makes every parameterised op an identity; the parameterless ops are unaffected.
    """

    #: Largest rotation in degrees at magnitude 1 (shear and shift maxima are `cfg.shear`, `cfg.translate`).
    ROTATE_DEG = 30.0
    #: Range of the enhancement factors (Color, Contrast, Brightness, Sharpness) at magnitude 1.
    ENHANCE = (0.05, 0.95)
    #: Range of posterize's bit count before truncation to an int, at magnitude 1.
    POSTERIZE = (4.0, 8.0)

    #: Ops that move pixels (one affine warp per slot) and ops without a pixel change.
    GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

    def __init__(self, cfg: StrongAugmentConfig, mean: Sequence[float], std: Sequence[float],
                 masked: bool | None = None):
        """`masked`: apply every op to the whole batch and keep, per image, the result of its own op
        (no host synchronisation: the fast way on a GPU); otherwise each op runs on the images that drew
        it (least arithmetic: the fast way on a CPU). None picks by the device of the batch. Both give
        every image the same result for the same random draws."""
        self.cfg = cfg
        self.ops = list(cfg.ops)
        self.norm = Normalize(mean, std)
        self.masked = masked

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg, dev = self.cfg, images.device
        x = to_unit_float(images)
        n = x.shape[0]
        if cfg.flip:
            flip = _bernoulli(n, 0.5, gen, dev).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        for _ in range(cfg.n_ops):
            op = torch.randint(len(self.ops), (n,), generator=gen, device=dev)
            u = torch.rand(n, generator=gen, device=dev)
            sign = torch.where(_bernoulli(n, 0.5, gen, dev), -1.0, 1.0)
            masked = self.masked if self.masked is not None else x.device.type == "cuda"
            x = (self._apply_slot_masked if masked else self._apply_slot)(x, op, u, sign)
        x = self.norm.standardise(x)
        if cfg.cutout > 0:
            x = self._cutout(x, gen)
        return x

    def _apply_slot(self, x: torch.Tensor, op: torch.Tensor, u: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        h, w = x.shape[-2:]
        mag = self.cfg.magnitude
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        geometric = torch.zeros(n, dtype=torch.bool, device=dev)
        signed = sign * mag * u  # in [-magnitude, magnitude]
        for k, name in enumerate(self.ops):
            sel = op == k
            if name == "rotate":
                a = torch.deg2rad(signed * self.ROTATE_DEG)
                theta[sel, 0, 0], theta[sel, 0, 1] = torch.cos(a)[sel], -torch.sin(a)[sel]
                theta[sel, 1, 0], theta[sel, 1, 1] = torch.sin(a)[sel], torch.cos(a)[sel]
            elif name in ("shear_x", "shear_y"):
                # PIL's AFFINE data (1, v, 0, 0, 1, 0) reads input x = x_out + v * y_out with the origin at
                # the top-left corner; in grid_sample's centred [-1, 1] coordinates that is a shear plus an
                # offset of v (scaled by the aspect ratio).
                s = signed * self.cfg.shear
                row, other = (0, h / w) if name == "shear_x" else (1, w / h)
                theta[sel, row, 1 - row] = (s * other)[sel]
                theta[sel, row, 2] = (s * other)[sel]
            elif name == "translate_x":
                theta[sel, 0, 2] = (signed * self.cfg.translate * 2)[sel]
            elif name == "translate_y":
                theta[sel, 1, 2] = (signed * self.cfg.translate * 2)[sel]
            else:
                continue
            geometric |= sel
        gidx = geometric.nonzero().squeeze(1)
        if gidx.numel():
            x[gidx] = warp(x[gidx], theta[gidx])
        params = self._pixel_params(u)
        for k, name in enumerate(self.ops):
            idx = (op == k).nonzero().squeeze(1)
            if idx.numel() == 0 or name == "identity" or name in self.GEOMETRIC:
                continue
            x[idx] = self._pixel_op(name, x[idx], {key: v[idx] for key, v in params.items()})
        return x

    def _apply_slot_masked(
        self, x: torch.Tensor, op: torch.Tensor, u: torch.Tensor, sign: torch.Tensor
    ) -> torch.Tensor:
        """`_apply_slot` without data-dependent shapes: every op on the whole batch, chosen per image."""
        h, w = x.shape[-2:]
        mag = self.cfg.magnitude

        def drew(name: str) -> torch.Tensor:
            return op == (self.ops.index(name) if name in self.ops else -1)

        signed = sign * mag * u
        a = torch.deg2rad(signed * self.ROTATE_DEG)
        rot, zero, one = drew("rotate"), torch.zeros_like(u), torch.ones_like(u)
        shear, shift = signed * self.cfg.shear, signed * self.cfg.translate * 2
        sx, sy = drew("shear_x"), drew("shear_y")
        shear_x, shear_y = torch.where(sx, shear * h / w, zero), torch.where(sy, shear * w / h, zero)
        row0 = [torch.where(rot, torch.cos(a), one), torch.where(rot, -torch.sin(a), shear_x),
                torch.where(sx, shear_x, torch.where(drew("translate_x"), shift, zero))]
        row1 = [torch.where(rot, torch.sin(a), shear_y), torch.where(rot, torch.cos(a), one),
                torch.where(sy, shear_y, torch.where(drew("translate_y"), shift, zero))]
        theta = torch.stack([torch.stack(row0, dim=1), torch.stack(row1, dim=1)], dim=1)
        geometric = torch.stack([drew(name) for name in self.GEOMETRIC]).any(dim=0)
        if any(name in self.ops for name in self.GEOMETRIC):
            x = torch.where(_col(geometric), warp(x, theta), x)
        params = self._pixel_params(u)
        out = x
        for name in self.ops:
            if name == "identity" or name in self.GEOMETRIC:
                continue
            out = torch.where(_col(drew(name)), self._pixel_op(name, x, params), out)
        return out

    def _pixel_params(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image parameters of the pixel ops from their strengths `u`."""
        mag = self.cfg.magnitude
        lo, hi = self.ENHANCE
        plo, phi = self.POSTERIZE
        return {
            "factor": 1.0 - mag * (1.0 - (lo + u * (hi - lo))),
            "bits": torch.floor(8.0 - mag * (8.0 - (plo + u * (phi - plo)))).clamp_(max=8.0),
            # PIL inverts pixels p >= T (p in 0..255, T in [0, 256]); on x = p / 255 that is x >= T / 255.
            "threshold": 256.0 * (1.0 - mag * u) / 255.0,
        }

    @staticmethod
    def _pixel_op(name: str, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if name == "autocontrast":
            return TF.autocontrast(x)
        if name == "equalize":
            return TF.equalize(x)
        if name == "solarize":
            return solarize(x, p["threshold"])
        if name == "posterize":
            return posterize(x, p["bits"])
        if name == "color":
            return adjust_saturation(x, p["factor"])
        if name == "contrast":
            return adjust_contrast(x, p["factor"])
        if name == "brightness":
            return adjust_brightness(x, p["factor"])
        if name == "sharpness":
            return adjust_sharpness(x, p["factor"])
        raise ValueError(f"unknown strong-augmentation op '{name}'")

    def _cutout(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        longest = max(1, round(self.cfg.cutout * min(h, w)))
        side = torch.randint(1, longest + 1, (n,), generator=gen, device=dev).float()
        cy = torch.randint(0, h, (n,), generator=gen, device=dev).float()
        cx = torch.randint(0, w, (n,), generator=gen, device=dev).float()
        rows = torch.arange(h, device=dev).float().view(1, h, 1)
        cols = torch.arange(w, device=dev).float().view(1, 1, w)
        half = (side / 2).view(-1, 1, 1)
        inside = ((rows - cy.view(-1, 1, 1)).abs() < half) & ((cols - cx.view(-1, 1, 1)).abs() < half)
        return x.masked_fill(inside.unsqueeze(1), 0.0)
