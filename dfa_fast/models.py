"""Encoders (the Colored MNIST MLP, a ResNet-18 in the torchvision layout) and method containers.

Every container is one `nn.Module` holding all trainable parts of a method, which is what DeepSpeed
wraps: Vanilla one encoder + Linear(D, C); LfF two independent such networks; DisEnt two encoders
and two Linear(2D, C) classifiers over the concatenated features (docs/method.md, "Models").
"""
from __future__ import annotations

import torch
from torch import nn

from dfa_fast import ops
from dfa_fast.config import ModelConfig

MNIST_INPUT = 3 * 28 * 28


class MLPEncoder(nn.Module):
    """2352 -> 100 -> 100 -> 16 with ReLU after each layer, on the input flattened in (H, W, C)
    order: free for the channels-last batches the loader makes. (The reference flattens (C, H, W);
    with i.i.d. initialisation a fixed permutation of the inputs is the same model.)

    The reference's doubly scaled pixels ([0, 1/255]) are ``model.input_scale``, applied once per
    batch by the data transform rather than by each encoder.

    The Linear + ReLU chain goes through `dfa_fast.ops`: in float32 on a CPU oneDNN
    (`kernels.onednn_linear`), 2-2.6x faster than PyTorch's MKL products on AMD processors;
    elsewhere, under autocast and with ``DFA_KERNELS=torch`` the plain modules.
    """

    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(MNIST_INPUT, 100), nn.ReLU(),
                                    nn.Linear(100, 100), nn.ReLU(),
                                    nn.Linear(100, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (B, 16) features of a (B, 3, 28, 28) batch."""
        x = x.permute(0, 2, 3, 1).flatten(1)
        first, _, second, _, third, _ = self.layers  # iterating: no new Sequential per call
        return ops.linear_relu_chain(x, (first, second, third))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's output."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Encoder(nn.Module):
    """ResNet-18 up to global average pooling (512 features), torchvision layout and init.

    ``stem="imagenet"``: 7x7 stride-2 convolution and 3x3 max-pool (the published setting, also at
    32 px); ``stem="cifar"``: one 3x3 stride-1 convolution, no max-pool.
    """

    feature_dim = 512

    def __init__(self, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(channels, width, stride),
                                        BasicBlock(width, width, 1)))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (B, 512) pooled features of a (B, 3, H, W) batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """Return a fresh encoder of the configured architecture."""
    if cfg.arch == "mlp":
        return MLPEncoder()
    return ResNet18Encoder(cfg.stem)


class Classifier(nn.Module):
    """Encoder + Linear(D, C): the network of Vanilla, and each of LfF's two networks."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.encoder = build_encoder(cfg)
        self.fc = nn.Linear(self.encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (B, C) logits."""
        return self.fc(self.encoder(x))


class LfFModel(nn.Module):
    """LfF's debiased network (``debiased``) and its biased twin (``biased``), independent."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.debiased = Classifier(cfg, num_classes)
        self.biased = Classifier(cfg, num_classes)


class DisEntModel(nn.Module):
    """DisEnt's intrinsic and bias encoders and their classifiers over [z_i, z_b] (2D -> C)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.encoder_i = build_encoder(cfg)
        self.encoder_b = build_encoder(cfg)
        dim = self.encoder_i.feature_dim
        self.fc_i = nn.Linear(2 * dim, num_classes)
        self.fc_b = nn.Linear(2 * dim, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z_i, z_b), each (B, D)."""
        return self.encoder_i(x), self.encoder_b(x)
