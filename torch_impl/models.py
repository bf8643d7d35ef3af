"""The five CNNs as torch nn.Modules (mirror of tf_impl/models.py).

Attribute paths equal the canonical layer names of common.architectures, so
``model.get_submodule("stage2.block0.conv1")`` is that layer. Every builder
takes ``(num_classes, in_shape, bn_momentum, bn_epsilon)`` with ``in_shape``
NHWC ``(H, W, C)``; ``create_model`` attaches the model's ``arch_spec``.
Models return logits (no softmax). Initial values come from common.init via
``set_weights``; torch's own initialisers are overwritten.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from common.architectures import (MOBILENET_V2_CONFIG, MOBILENET_V2_DROPOUT, MOBILENET_V2_LAST_CHANNELS,
                                  VGG11_CONFIG, arch_spec)
from common.registry import ModelRegistry
from torch_impl.layers import activation, basic_block, conv2d, conv_bn, dense, global_max_pool, inverted_residual

MODELS = ModelRegistry("torch")


class _SeedCNN(nn.Module):
    """3 x (conv3x3 with bias -> ReLU -> maxpool 2) -> flatten -> fc1 1024 -> fc2 512 -> head."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__()
        height, width, channels = in_shape
        self.conv1 = conv2d(channels, 64, bias=True)
        self.conv2 = conv2d(64, 128, bias=True)
        self.conv3 = conv2d(128, 256, bias=True)
        self.pool = nn.MaxPool2d(2)  # floor mode, as Keras 'valid' pooling
        self.relu = activation("relu")
        # Three floor-halvings; torch flattens (C, H, W) - common.weights permutes fc1's rows.
        self.fc1 = dense(256 * (height // 8) * (width // 8), 1024)
        self.fc2 = dense(1024, 512)
        self.head = dense(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = self.pool(self.relu(conv(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.head(x)


class _CifarResNet(nn.Module):
    """stem conv-BN-ReLU -> stages of BasicBlocks -> global average pool -> dense head.

    The first block of every stage after the first has stride 2.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], widths: tuple[int, ...],
                 blocks_per_stage: int, shortcut: str, bn_momentum: float, bn_epsilon: float):
        super().__init__()
        bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
        self.stem = conv_bn(in_shape[2], widths[0], **bn)
        in_channels = widths[0]
        self.stage_names = []
        for stage, width in enumerate(widths, start=1):
            blocks = OrderedDict()
            for index in range(blocks_per_stage):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks[f"block{index}"] = basic_block(in_channels, width, stride, shortcut, **bn)
                in_channels = width
            self.add_module(f"stage{stage}", nn.Sequential(blocks))
            self.stage_names.append(f"stage{stage}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = dense(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.head(torch.flatten(self.pool(x), 1))


class _VGG11BN(nn.Module):
    """VGG-11 (conv with bias -> BN -> ReLU, max-pools), last pool global max, dense head."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float,
                 bn_epsilon: float):
        super().__init__()
        in_channels, index = in_shape[2], 0
        self.plan: list[str] = []  # block names and "M" (max-pool) in forward order
        for item in VGG11_CONFIG:
            if item == "M":
                self.plan.append("M")
                continue
            index += 1
            self.add_module(f"block{index}", conv_bn(in_channels, item, bias=True,
                                                    bn_momentum=bn_momentum, bn_epsilon=bn_epsilon))
            self.plan.append(f"block{index}")
            in_channels = item
        self.pool = nn.MaxPool2d(2)
        self.global_pool = global_max_pool()
        self.head = dense(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.plan) - 1
        for position, item in enumerate(self.plan):
            if item == "M":
                x = self.global_pool(x) if position == last else self.pool(x)
            else:
                x = getattr(self, item)(x)
        return self.head(torch.flatten(x, 1))


class _MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (stride-1 stem): inverted residual blocks, 1280-channel 1x1, dropout, head."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float,
                 bn_epsilon: float, dropout: float):
        super().__init__()
        bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
        self.stem = conv_bn(in_shape[2], 32, act="relu6", **bn)
        in_channels = 32
        self.block_names: list[str] = []
        for expansion, out_channels, repeats, first_stride in MOBILENET_V2_CONFIG:
            for i in range(repeats):
                name = f"block{len(self.block_names)}"
                stride = first_stride if i == 0 else 1
                self.add_module(name, inverted_residual(in_channels, out_channels, stride, expansion, **bn))
                self.block_names.append(name)
                in_channels = out_channels
        self.last = conv_bn(in_channels, MOBILENET_V2_LAST_CHANNELS, 1, act="relu6", **bn)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = dense(MOBILENET_V2_LAST_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.pool(self.last(x)), 1)
        return self.head(self.dropout(x))


@MODELS.register("seed_cnn")
def seed_cnn(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """The seed CNN (no BatchNorm: the BN arguments are accepted and unused)."""
    return _SeedCNN(num_classes, in_shape)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """He et al. 2016 CIFAR ResNet-20 with option-A shortcuts."""
    return _CifarResNet(num_classes, in_shape, (16, 32, 64), 3, "A", bn_momentum, bn_epsilon)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, projection shortcuts."""
    return _CifarResNet(num_classes, in_shape, (64, 128, 256, 512), 2, "projection", bn_momentum, bn_epsilon)


@MODELS.register("vgg11_bn")
def vgg11_bn(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """VGG-11 with BatchNorm and a global max-pool before the head."""
    return _VGG11BN(num_classes, in_shape, bn_momentum, bn_epsilon)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
                 bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """MobileNetV2 width 1.0, CIFAR strides."""
    return _MobileNetV2(num_classes, in_shape, bn_momentum, bn_epsilon,
                        MOBILENET_V2_DROPOUT if dropout is None else dropout)


def create_model(name: str, num_classes: int = 10, in_shape: tuple[int, int, int] = (32, 32, 3),
                 bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> nn.Module:
    """Build ``name`` (on the CPU, float32, NCHW) and attach its canonical ``arch_spec``."""
    in_shape = tuple(int(d) for d in in_shape)
    model = MODELS.create(name, num_classes=int(num_classes), in_shape=in_shape,
                          bn_momentum=float(bn_momentum), bn_epsilon=float(bn_epsilon), dropout=dropout)
    model.arch_spec = arch_spec(name, num_classes, in_shape)
    return model

