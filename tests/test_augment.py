import pytest
import torch
import torch.nn.functional as F
from nnm.engine.augment import (
    Normalize,
    SimCLRAugment,
    StrongAugment,
    crop_flip_rotate_theta,
    hsv_to_rgb,
    per_image_order,
    rgb_to_hsv,
)
from nnm.engine.config import SimCLRAugmentConfig, StrongAugmentConfig

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def batch_of_identical_images(n=16, size=16):
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
    return one.repeat(n, 1, 1, 1)


def test_simclr_draws_independent_parameters_per_image():
    x = batch_of_identical_images()
    out = SimCLRAugment(SimCLRAugmentConfig(), MEAN, STD)(x, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 16, 16) and out.dtype == torch.float32
    flat = out.flatten(1)
    # Same input image, so any two equal outputs would mean shared random parameters.
    distinct = {tuple(torch.round(r * 1e4).tolist()) for r in flat}
    assert len(distinct) == 16


def test_crop_parameters_differ_per_sample_and_respect_scale():
    cfg = SimCLRAugmentConfig(crop_scale=(0.2, 1.0), flip=True)
    theta = crop_flip_rotate_theta(1000, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    area = theta[:, 0, 0].abs() * theta[:, 1, 1].abs()
    assert area.min() >= 0.2 * 0.999 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean().item() < 0.6  # about half flipped
    assert theta[:, 0, 2].unique().numel() > 900


def test_strong_augment_is_per_sample_and_deterministic_for_a_seed():
    x = batch_of_identical_images()
    aug = StrongAugment(StrongAugmentConfig(), MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(torch.round(r * 1e4).tolist()) for r in a.flatten(1)}) > 12


def test_strong_augment_without_ops_is_flip_and_cutout_only():
    x = batch_of_identical_images(n=64)
    cfg = StrongAugmentConfig(n_ops=0, cutout=0.0, flip=True)
    out = StrongAugment(cfg, MEAN, STD)(x, torch.Generator().manual_seed(0))
    plain = Normalize(MEAN, STD)(x)
    flipped = plain.flip(-1)
    same = [(torch.allclose(o, p) or torch.allclose(o, f)) for o, p, f in zip(out, plain, flipped, strict=True)]
    assert all(same)


def test_hsv_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)


def test_single_channel_images_are_supported():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 1, 16, 16), generator=g, dtype=torch.uint8)
    assert SimCLRAugment(SimCLRAugmentConfig(), [0.5], [0.25])(x, g).shape == (8, 1, 16, 16)
    assert StrongAugment(StrongAugmentConfig(), [0.5], [0.25])(x, g).shape == (8, 1, 16, 16)


# --- colour-jitter order -------------------------------------------------------------------------


def test_per_image_order_gives_a_permutation_per_row():
    order = per_image_order(2400, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert order.shape == (2400, 4)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(2400, 4))
    assert len({tuple(r) for r in order.tolist()}) == 24
    first = torch.bincount(order[:, 0], minlength=4).float() / 2400
    assert torch.all((first - 0.25).abs() < 0.04)


def _half_black_half_white(n: int, size: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[..., size // 2 :] = 255
    return x


def test_jitter_order_is_drawn_per_image():
    """Brightness and contrast commute unless clipping happens, so the order shows in clipped images.

    On a half-black, half-white image (mean luma 0.5), with output values a (black half) and b (white half):
    brightness then contrast always gives a + b <= 1, and a + b == 1 with 0 < a, b < 1 whenever brightness
    >= 1 and contrast < 1; contrast then brightness gives a + b > 1 whenever brightness > 1 and contrast < 1,
    and a + b == 1 only when brightness is exactly 1. One order per batch could show only one signature.
    """
    cfg = SimCLRAugmentConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip=False,
        jitter=(0.9, 0.9, 0.0, 0.0),
        jitter_p=1.0,
        grayscale_p=0.0,
    )
    out = SimCLRAugment(cfg, [0, 0, 0], [1, 1, 1])(_half_black_half_white(512), torch.Generator().manual_seed(3))
    a = out[..., 2:-2, 2:6].median(dim=-1).values.flatten(1).median(dim=1).values
    b = out[..., 2:-2, 10:14].median(dim=-1).values.flatten(1).median(dim=1).values
    contrast_first = (a + b > 1 + 1e-3).sum().item()
    brightness_first = (((a + b - 1).abs() < 1e-5) & (a > 0.01) & (b < 0.99)).sum().item()
    assert contrast_first > 10 and brightness_first > 10, (contrast_first, brightness_first)


def test_jitter_factors_are_drawn_per_image():
    cfg = SimCLRAugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, jitter_p=1.0, grayscale_p=0.0)
    out = SimCLRAugment(cfg, MEAN, STD)(batch_of_identical_images(n=32), torch.Generator().manual_seed(0))
    assert len({tuple(torch.round(r * 1e4).tolist()) for r in out.flatten(1)}) == 32


def test_jitter_not_applied_leaves_colours_unchanged():
    cfg = SimCLRAugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0)
    x = batch_of_identical_images(n=8)
    out = SimCLRAugment(cfg, MEAN, STD)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, Normalize(MEAN, STD)(x), atol=1e-5)


# --- strong augmentation ranges ------------------------------------------------------------------


def _strong(op: str, images: torch.Tensor, magnitude: float = 1.0, seed: int = 0, **ranges: float) -> torch.Tensor:
    """One op per image, no flip or Cutout, output in [0, 1] (mean 0, std 1)."""
    cfg = StrongAugmentConfig(ops=[op], n_ops=1, flip=False, cutout=0.0, magnitude=magnitude, **ranges)
    c = images.shape[1]
    return StrongAugment(cfg, [0.0] * c, [1.0] * c)(images, torch.Generator().manual_seed(seed))


def _random_midtone_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, 216, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13) on the interior."""
    k = torch.ones(3, 3)
    k[1, 1] = 5.0
    return F.conv2d(x, (k / 13).expand(x.shape[1], 1, 3, 3), groups=x.shape[1])


_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _strength(op: str, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The enhancement factor each image was given, recovered from its pixels."""
    if op == "brightness":
        return after.mean(dim=(1, 2, 3)) / before.mean(dim=(1, 2, 3))
    if op == "contrast":
        return after.std(dim=(1, 2, 3)) / before.std(dim=(1, 2, 3))
    if op == "color":

        def chroma(t):
            return (t - (t * _GRAY).sum(dim=1, keepdim=True)).flatten(1).norm(dim=1)

        return chroma(after) / chroma(before)
    # sharpness: interior pixels are smoothed + f * (x - smoothed)
    s = _smooth(before)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    return (after[inner] - s).flatten(1).norm(dim=1) / (before[inner] - s).flatten(1).norm(dim=1)


@pytest.mark.parametrize("op", ["brightness", "contrast", "color", "sharpness"])
def test_enhancement_ops_only_weaken_within_scans_range(op):
    x = _random_midtone_images(512)
    f = _strength(op, x.float() / 255, _strong(op, x))
    assert f.min() >= 0.05 - 1e-3 and f.max() <= 0.95 + 1e-3, (f.min(), f.max())
    assert f.min() < 0.1 and f.max() > 0.9  # the whole range is used


def test_magnitude_scales_the_distance_from_identity():
    x = _random_midtone_images(512)
    f = _strength("brightness", x.float() / 255, _strong("brightness", x, magnitude=0.5))
    assert f.min() >= 1 - 0.5 * 0.95 - 1e-3 and f.max() <= 1 - 0.5 * 0.05 + 1e-3
    for op in ("brightness", "contrast", "rotate", "shear_x", "translate_y", "solarize", "posterize"):
        assert torch.allclose(_strong(op, x, magnitude=0.0), x.float() / 255, atol=1e-5), op


def _vertical_line(n: int, size: int = 32, column: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[..., column] = 255
    return x


def _row_shift(out: torch.Tensor, column: int) -> torch.Tensor:
    """Shift of the line's centroid in every row, shape (n, rows), in pixels."""
    cols = torch.arange(out.shape[-1], dtype=out.dtype)
    mass = out[:, 0].sum(dim=-1)
    return (out[:, 0] * cols).sum(dim=-1) / mass - column


@pytest.mark.parametrize("ranges,top", [({}, 0.1), ({"translate": 0.3, "magnitude": 0.6}, 0.18)])
def test_translate_stays_within_a_tenth_of_the_side(ranges, top):
    """SCAN's +-0.1 of the side by default; a configured maximum, scaled by magnitude, otherwise."""
    out = _strong("translate_x", _vertical_line(512), **ranges)
    shift = _row_shift(out, 16)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)  # a pure shift
    frac = shift[:, 0].abs() / 32
    assert frac.max() <= top + 1e-4 and frac.max() > 0.9 * top
    assert (shift[:, 0] > 0).any() and (shift[:, 0] < 0).any()


@pytest.mark.parametrize("ranges,top", [({}, 0.1), ({"shear": 0.3, "magnitude": 0.6}, 0.18)])
def test_shear_stays_within_scans_range_about_the_top_left_corner(ranges, top):
    out = _strong("shear_x", _vertical_line(512), **ranges)
    # PIL's shear reads input x = x_out + v * y_out from the top-left corner, so row y moves by v * (y + 0.5).
    v = -_row_shift(out, 16) / (torch.arange(32, dtype=out.dtype) + 0.5)
    assert torch.allclose(v, v[:, :1].expand_as(v), atol=1e-4)
    assert v.abs().max() <= top + 1e-4 and v.abs().max() > 0.9 * top
    assert (v[:, 0] > 0).any() and (v[:, 0] < 0).any()


def test_posterize_keeps_four_to_seven_bits():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(256, 1, 1, 1)
    out = torch.round(_strong("posterize", x) * 255).long()
    dropped = []  # low bits cleared in each image: 8 - kept bits
    for img in out:
        k = 0
        while k < 8 and torch.all(img % (2 ** (k + 1)) == 0):
            k += 1
        dropped.append(k)
    assert set(dropped) == {1, 2, 3, 4}


def test_solarize_threshold_spans_the_whole_range():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(512, 1, 1, 1)
    out = torch.round(_strong("solarize", x) * 255).flatten(1)
    inverted = (out != x.flatten(1).float()).sum(dim=1).float()  # pixels >= threshold (255 - p != p)
    assert inverted.min() <= 8 and inverted.max() >= 248
    assert 0.4 < (inverted > 128).float().mean().item() < 0.6  # threshold uniform in [0, 256]


def test_strong_parameters_are_independent_per_image():
    x = _random_midtone_images(1).repeat(64, 1, 1, 1)
    for op in ("brightness", "rotate", "translate_x"):
        out = _strong(op, x)
        assert len({tuple(torch.round(r * 1e4).tolist()) for r in out.flatten(1)}) == 64, op


# --- the masked (GPU) strong augmentation -----------------------------------------------------------


@pytest.mark.parametrize("channels,magnitude,wide", [(3, 1.0, 0.1), (3, 0.6, 0.1), (1, 1.0, 0.1), (1, 0.6, 0.3)])
def test_masked_strong_augment_gives_every_image_what_the_subset_path_gives(channels, magnitude, wide):
    """The GPU path (every op on the whole batch, chosen per image by mask) draws the same random numbers
    and gives every image the same pixels as the CPU path (each op on the images that drew it): so each
    image keeps its own op and parameters, and the distribution is the one the per-image tests check."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (256, channels, 20, 24), generator=g, dtype=torch.uint8)  # not square
    # all 14 ops, 4 slots, flip and cutout; the digit presets' wider shear and shift in the last case
    cfg = StrongAugmentConfig(magnitude=magnitude, shear=wide, translate=wide)
    mean, std = [0.5] * channels, [0.25] * channels
    subset = StrongAugment(cfg, mean, std, masked=False)(x, torch.Generator().manual_seed(11))
    masked = StrongAugment(cfg, mean, std, masked=True)(x, torch.Generator().manual_seed(11))
    assert torch.allclose(masked, subset, atol=1e-5)
    # and the images differ from each other: per-image parameters, not one draw for the batch
    same_input = x[:1].repeat(64, 1, 1, 1)
    out = StrongAugment(cfg, mean, std, masked=True)(same_input, torch.Generator().manual_seed(12))
    assert len({tuple(torch.round(r * 1e3).tolist()) for r in out.flatten(1)}) > 60


def test_masked_strong_augment_with_a_subset_of_ops():
    """Ops missing from the list are never drawn, in either path (digits use no colour ops)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (64, 1, 16, 16), generator=g, dtype=torch.uint8)
    cfg = StrongAugmentConfig(ops=["identity", "rotate", "posterize", "translate_y"], cutout=0.0)
    subset = StrongAugment(cfg, [0.5], [0.25], masked=False)(x, torch.Generator().manual_seed(5))
    masked = StrongAugment(cfg, [0.5], [0.25], masked=True)(x, torch.Generator().manual_seed(5))
    assert torch.allclose(masked, subset, atol=1e-5)
