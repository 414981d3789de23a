"""Backbones and heads, with parameter names that follow the reference layout.

`backbone.*`, `contrastive_head.{0,2}.*`, `cluster_head.N.*` and the CIFAR ResNet's
`layerL.0.shortcut.{0,1}` match the SCAN/NNM checkpoints, so those load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig


class BasicBlock(nn.Module):
    """ResNet basic block; the projection shortcut is `shortcut.0` (1x1 conv) + `shortcut.1` (BN)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Small(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem, then no max-pool (CIFAR) or, with `stem_pool`, the
    STL-10 layout's 2x2 stride-2 max-pool with padding 1.

    On 96x96 STL-10 images the padded pool gives the reference spatial sizes 96 -> 49 -> 49 -> 25 -> 13 -> 7,
    so the final average pool covers 7x7 (an unpadded pool would give 48 -> ... -> 6). The final pool is
    adaptive, so other image sizes work too. `width` is the channel count of the first stage (64 for the
    standard network).
    """

    def __init__(self, width: int = 64, in_channels: int = 3, stem_pool: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.stem_pool = stem_pool
        planes, layers = width, []
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(planes, out, stride), BasicBlock(out, out, 1)))
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = width * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem_pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build_backbone(cfg: BackboneConfig, in_channels: int) -> nn.Module:
    """Build the backbone named by `cfg`; it has an `out_dim` attribute (the pooled feature size)."""
    if cfg.arch == "resnet50":
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity()
        net.out_dim = 2048  # type: ignore[assignment]
        return net
    return ResNet18Small(cfg.width, in_channels, stem_pool=(cfg.arch == "resnet18-stl"))


class ContrastiveModel(nn.Module):
    """Backbone + SimCLR MLP head (d -> d -> ReLU -> feature_dim), output L2-normalised."""

    def __init__(self, backbone: nn.Module, feature_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        self.contrastive_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.contrastive_head(self.backbone(x)), dim=1)


class ClusteringModel(nn.Module):
    """Backbone + `heads` linear cluster heads (`cluster_head.N`)."""

    def __init__(self, backbone: nn.Module, clusters: int, heads: int = 1):
        super().__init__()
        self.backbone = backbone
        self.cluster_head = nn.ModuleList(nn.Linear(backbone.out_dim, clusters) for _ in range(heads))

    @property
    def num_heads(self) -> int:
        return len(self.cluster_head)

    @property
    def num_clusters(self) -> int:
        return self.cluster_head[0].out_features

    def forward_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head for given backbone features."""
        return [head(features) for head in self.cluster_head]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (backbone features, logits of every head)."""
        features = self.backbone(x)
        return features, self.forward_features(features)

    def keep_head(self, index: int) -> None:
        """Drop every head but `index` (it becomes `cluster_head.0`)."""
        self.cluster_head = nn.ModuleList([self.cluster_head[index]])
