import numpy as np
import pytest
import torch
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
