"""Shared building blocks of the torch models (mirror of tf_impl/layers.py).

Every weight-owning module sits at the attribute path that IS its canonical
layer name (``stage1.block0.conv1``, ``block3.expand.bn`` ...), so the
canonical name -> module map is simply ``model.get_submodule(name)``.

Padding: 3x3 convs (strided or not, depthwise included) pad 1 on every side
and 1x1 convs pad 0. That is torch's native behaviour and the symmetric
padding the contract fixes (Keras 'same' would pad (0, 1) at stride 2; the TF
side pads explicitly instead).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}
# The BatchNorm layer class of this side: torch's own, which already updates running_var with the
# unbiased batch variance (the convention the contract fixes). tf_impl.layers.BatchNorm is a Keras
# BatchNormalization changed to do the same.
BatchNorm = nn.BatchNorm2d


def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
           groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A conv with symmetric padding kernel_size // 2 (1 for 3x3, 0 for 1x1)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     groups=groups, bias=bias)


def batch_norm(channels: int, momentum: float, epsilon: float) -> BatchNorm:
    """BatchNorm with the recipe's momentum/epsilon (torch convention, no translation needed).

    torch updates the running variance with the unbiased batch variance and
    normalises with the biased one: exactly the convention the contract fixes.
    """
    return BatchNorm(channels, eps=epsilon, momentum=momentum)


def depthwise_conv2d(channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A depthwise conv (depth multiplier 1, no bias), padded like ``conv2d``."""
    return conv2d(channels, channels, kernel_size, stride, groups=channels)


def dense(in_features: int, units: int) -> nn.Linear:
    """A dense layer with bias (its output observable before any activation)."""
    return nn.Linear(in_features, units)


def activation(name: str | None) -> nn.Module:
    """ReLU / ReLU6 (in place: saves one activation buffer per layer) or identity."""
    return nn.Identity() if name is None else _ACTIVATIONS[name](inplace=True)


class _ConvBN(nn.Module):
    """conv -> BN -> optional activation; children named ``conv`` and ``bn`` (canonical names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, bias: bool = False, act: str | None = "relu", *,
                 bn_momentum: float, bn_epsilon: float):
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride, groups, bias)
        self.bn = batch_norm(out_channels, bn_momentum, bn_epsilon)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class OptionAShortcut(nn.Module):
    """He et al.'s parameter-free shortcut: take even rows/cols, zero-pad the new channels.

    (out-in)//2 zero channels go before the input channels and the rest after.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # F.pad pads the last dims first: (W left, W right, H top, H bottom, C before, C after).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _BasicBlock(nn.Module):
    """ResNet basic block: conv1 -> bn1 -> relu -> conv2 -> bn2 -> (+ shortcut) -> relu.

    ``shortcut`` is "A" (option-A, resnet20) or "projection" (1x1 conv + BN,
    resnet18, child named ``shortcut`` with ``conv``/``bn``); identity when the
    shape does not change.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str, *,
                 bn_momentum: float, bn_epsilon: float):
        super().__init__()
        self.conv1 = conv2d(in_channels, out_channels, 3, stride)
        self.bn1 = batch_norm(out_channels, bn_momentum, bn_epsilon)
        self.relu1 = activation("relu")
        self.conv2 = conv2d(out_channels, out_channels, 3, 1)
        self.bn2 = batch_norm(out_channels, bn_momentum, bn_epsilon)
        self.relu2 = activation("relu")
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = _ConvBN(in_channels, out_channels, 1, stride, act=None,
                                   bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: [expand 1x1 -> BN -> ReLU6] -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN.

    The expand stage exists only when ``expansion != 1``; the residual is
    added when stride == 1 and the channel count is unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, *,
                 bn_momentum: float, bn_epsilon: float):
        super().__init__()
        hidden = in_channels * expansion
        bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
        self.expand = _ConvBN(in_channels, hidden, 1, act="relu6", **bn) if expansion != 1 else None
        self.depthwise = _ConvBN(hidden, hidden, 3, stride, groups=hidden, act="relu6", **bn)
        self.project = _ConvBN(hidden, out_channels, 1, act=None, **bn)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class _GlobalMaxPool(nn.Module):
    """Max over H and W, keeping (N, C, 1, 1).

    ``amax`` rather than AdaptiveMaxPool2d: its backward is deterministic on
    CUDA and, like TF's reduce_max, splits the gradient evenly between ties.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=(2, 3), keepdim=True)



def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, bias: bool = False,
            act: str | None = "relu", depthwise: bool = False, *, bn_momentum: float,
            bn_epsilon: float) -> nn.Module:
    """conv -> BN -> optional activation; children ``conv`` and ``bn`` (canonical names)."""
    groups = in_channels if depthwise else 1
    return _ConvBN(in_channels, out_channels, kernel_size, stride, groups, bias, act,
                   bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)


def basic_block(in_channels: int, out_channels: int, stride: int, shortcut: str, *, bn_momentum: float,
                bn_epsilon: float) -> nn.Module:
    """ResNet basic block (see ``_BasicBlock``): option-A or projection shortcut."""
    return _BasicBlock(in_channels, out_channels, stride, shortcut, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)


def inverted_residual(in_channels: int, out_channels: int, stride: int, expansion: int, *, bn_momentum: float,
                      bn_epsilon: float) -> nn.Module:
    """MobileNetV2 block (see ``_InvertedResidual``)."""
    return _InvertedResidual(in_channels, out_channels, stride, expansion, bn_momentum=bn_momentum,
                             bn_epsilon=bn_epsilon)


def global_max_pool() -> nn.Module:
    """Max over H and W, keeping (N, C, 1, 1) (see ``_GlobalMaxPool``)."""
    return _GlobalMaxPool()
