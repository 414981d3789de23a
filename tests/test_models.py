import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnm.engine.checkpoint import extract_state_dict, import_backbone, safe_load
from nnm.engine.config import BackboneConfig
from nnm.engine.errors import CheckpointError
from nnm.engine.model_io import TrainedModel
from nnm.engine.models import ClusteringModel, ContrastiveModel, build_backbone


def test_parameter_names_follow_the_reference_layout():
    model = ClusteringModel(build_backbone(BackboneConfig(), 3), clusters=10, heads=3)
    keys = set(model.state_dict())
    assert "backbone.conv1.weight" in keys
    assert "backbone.layer2.0.shortcut.0.weight" in keys and "backbone.layer2.0.shortcut.1.running_mean" in keys
    assert "backbone.layer1.0.shortcut.0.weight" not in keys
    assert {"cluster_head.0.weight", "cluster_head.2.bias"} <= keys
    assert not any(k.startswith("backbone.fc") for k in keys)
    contrastive = ContrastiveModel(build_backbone(BackboneConfig(), 3))
    assert {"contrastive_head.0.weight", "contrastive_head.2.weight"} <= set(contrastive.state_dict())


@pytest.mark.parametrize("arch,size", [("resnet18-cifar", 32), ("resnet18-stl", 96)])
def test_backbones_produce_512_features(arch, size):
    net = build_backbone(BackboneConfig(arch=arch), 3).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, 512)


def _reference_stl_resnet18(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Independent eval-mode forward of the published STL-10 ResNet-18 layout over a state dict.

    3x3 stride-1 stem + BN + ReLU, MaxPool2d(kernel 2, stride 2, padding 1), four stages of two basic
    blocks (strides 1, 2, 2, 2; 1x1 conv + BN projection shortcut when the shape changes), then a fixed
    7x7 average pool. Returns the features and the spatial side entering the average pool.
    """

    def bn(t, p):
        w, b, rm, rv = (sd[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(t, rm, rv, w, b, training=False, eps=1e-5)

    def block(t, p, stride):
        out = F.relu(bn(F.conv2d(t, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
        out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=1, padding=1), f"{p}.bn2")
        if f"{p}.shortcut.0.weight" in sd:
            t = bn(F.conv2d(t, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
        return F.relu(out + t)

    t = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=1, padding=1), "bn1"))
    t = F.max_pool2d(t, kernel_size=2, stride=2, padding=1)
    for layer, stride in zip((1, 2, 3, 4), (1, 2, 2, 2), strict=True):
        t = block(t, f"layer{layer}.0", stride)
        t = block(t, f"layer{layer}.1", 1)
    side = t.shape[-1]
    return F.avg_pool2d(t, 7).flatten(1), side


def test_stl_backbone_matches_the_published_layout_numerically():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="resnet18-stl", width=8), 3).double()
    # Random, non-trivial BN affine parameters and running statistics, so every BN matters.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    sizes = []
    net.layer1.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    net.layer4.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    x = torch.randn(3, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        ours = net(x)
        ref, ref_side = _reference_stl_resnet18(net.state_dict(), x)
    assert ref_side == 7
    assert sizes == [49, 7]  # 96 -> 49 after the padded max-pool; 7 x 7 into the final pool
    assert ours.shape == ref.shape == (3, 64)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-10)


def test_resnet50_is_torchvision_layout():
    net = build_backbone(BackboneConfig(arch="resnet50"), 3)
    assert net.out_dim == 2048 and "layer1.0.downsample.0.weight" in net.state_dict()


def test_loads_a_scan_layout_clustering_checkpoint(tmp_path):
    """A file shaped like SCAN's clustering checkpoint: {'model': state_dict, 'head': numpy int}."""
    torch.manual_seed(0)
    reference = ClusteringModel(build_backbone(BackboneConfig(), 3), clusters=10, heads=3)
    path = tmp_path / "scan_cifar-10.pth.tar"
    torch.save({"model": reference.state_dict(), "head": np.int64(2)}, path)
    obj = safe_load(path)
    assert int(obj["head"]) == 2
    state = extract_state_dict(obj)
    model = ClusteringModel(build_backbone(BackboneConfig(), 3), clusters=10, heads=3)
    model.load_state_dict(state)
    model.keep_head(int(obj["head"]))
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[1][0], reference(x)[1][2])


def test_imports_a_pretext_backbone_with_module_prefix(tmp_path):
    src = ContrastiveModel(build_backbone(BackboneConfig(width=16), 3))
    path = tmp_path / "simclr.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    net = build_backbone(BackboneConfig(width=16), 3)
    import_backbone(net, str(path))
    assert torch.equal(net.conv1.weight, src.backbone.conv1.weight)


def test_import_adapts_rgb_stem_to_grayscale(tmp_path):
    src = build_backbone(BackboneConfig(width=16), 3)
    path = tmp_path / "rgb.pt"
    torch.save(src.state_dict(), path)
    gray = build_backbone(BackboneConfig(width=16), 1)
    import_backbone(gray, str(path))
    assert torch.allclose(gray.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True))


def test_import_rejects_wrong_architecture_with_a_clear_message(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(build_backbone(BackboneConfig(width=16), 3).state_dict(), path)
    with pytest.raises(CheckpointError, match="has shape"):
        import_backbone(build_backbone(BackboneConfig(width=32), 3), str(path))


class Arbitrary:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


def test_safe_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "obj": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        safe_load(path)


def test_trained_model_round_trip(tmp_path):
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.model_io import ModelInfo
    from nnm.engine.runtime import Runtime

    model = ClusteringModel(build_backbone(BackboneConfig(width=8), 1), clusters=3, heads=1).eval()
    info = ModelInfo(
        backbone=BackboneConfig(width=8),
        in_channels=1,
        image_size=16,
        mean=[0.5],
        std=[0.2],
        clusters=3,
        class_names=["a", "b", "c"],
        cluster_to_class=[2, 0, 1],
    )
    TrainedModel(model, info).save(tmp_path)
    loaded = TrainedModel.load(tmp_path)
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    rt = Runtime(RuntimeConfig(precision="fp32"))
    p1, _ = TrainedModel(model, info).predict(x, rt)
    p2, _ = loaded.predict(x, rt)
    assert np.allclose(p1, p2)
    assert loaded.class_of(0) == "c"


def test_compute_outputs_returns_every_row_in_order_as_float32_unless_asked_for_float16():
    from nnm.engine.augment import Normalize
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.model_io import compute_outputs
    from nnm.engine.runtime import Runtime

    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    proj, heads = torch.randn(48, 6), [torch.randn(6, 3), torch.randn(6, 5)]
    norm = Normalize([0.5] * 3, [0.25] * 3)

    def fn(x):
        feats = (x.flatten(1) @ proj).to(torch.bfloat16)  # a half-precision output comes back as float32
        return feats, [feats.float() @ w for w in heads]

    feats, logits = compute_outputs(fn, images, norm, Runtime(RuntimeConfig(device="cpu", precision="fp32")), 5)
    want = fn(norm(images).float())
    assert feats.dtype == torch.float32 and feats.shape == (23, 6)
    torch.testing.assert_close(feats, want[0].float(), rtol=1e-2, atol=1e-2)
    assert [lg.shape for lg in logits] == [(23, 3), (23, 5)]
    for got, ref in zip(logits, want[1], strict=True):
        torch.testing.assert_close(got, ref)
    # A float16 output (a caller halving a large set's features) stays float16; the others are float32.
    def fn_halved(x):
        f, lg = fn(x)
        return f.half(), lg

    fp32 = Runtime(RuntimeConfig(device="cpu", precision="fp32"))
    halved, logits16 = compute_outputs(fn_halved, images, norm, fp32, 5)
    assert halved.dtype == torch.float16 and [lg.dtype for lg in logits16] == [torch.float32] * 2
    torch.testing.assert_close(halved, feats.half())
    with pytest.raises(ValueError, match="at least one image"):
        compute_outputs(fn, images[:0], norm, Runtime(RuntimeConfig(device="cpu", precision="fp32")), 5)
