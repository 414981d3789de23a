import torch
from nnm.engine.augment import (
    Normalize,
    SimCLRAugment,
    StrongAugment,
    crop_flip_rotate_theta,
    hsv_to_rgb,
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
