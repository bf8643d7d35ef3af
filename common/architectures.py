"""Framework-free description of every model: canonical parameter names, shapes, MACs.

This is the single source of truth both backends are tested against. Each
model builder walks the architecture with shape tracking and records, per
layer, the canonical weights it owns:

* conv kernels HWIO ``(kh, kw, in, out)``; depthwise kernels ``(kh, kw, C, 1)``;
* dense kernels ``(in, out)``; a dense layer right after a flatten expects
  inputs in NHWC flatten order (the torch side permutes);
* BatchNorm: ``gamma, beta`` (trainable) and ``moving_mean, moving_variance``
  (buffers).

Names are ``<layer path>.<param>``, e.g. ``stage2.block0.conv1.kernel``.
The real models live in torch_impl/models.py and tf_impl/models.py; their
``get_weights`` must return exactly the names and shapes listed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

BN_BUFFERS = ("moving_mean", "moving_variance")
# The classifier every model ends with. Its input is the model's embedding: the penultimate-layer
# features that Backend.embed returns (eval mode) and retrieval ranks by cosine similarity.
EMBEDDING_LAYER = "head"


@dataclass(frozen=True)
class LayerSpec:
    """One layer that owns weights."""

    name: str  # canonical layer path, e.g. "stage1.block0.conv1"
    kind: str  # conv | dwconv | dense | bn
    params: dict[str, tuple[int, ...]]  # canonical param name suffix -> shape
    macs: int = 0  # multiply-accumulates per image
    after_flatten: tuple[int, int, int] | None = None  # dense after flatten: (H, W, C) of its input
    spatial: tuple[int, int] | None = None  # bn: (H, W) of its input, so a batch of B gives B*H*W values per channel


@dataclass
class ArchSpec:
    """Every weight-owning layer of one model, in forward order."""

    model: str
    num_classes: int
    in_shape: tuple[int, int, int]  # (H, W, C)
    layers: list[LayerSpec] = field(default_factory=list)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """All canonical weights (trainable and buffers): name -> shape."""
        return {f"{l.name}.{p}": s for l in self.layers for p, s in l.params.items()}

    def trainable_names(self) -> list[str]:
        return [n for n in self.weight_shapes() if n.rsplit(".", 1)[1] not in BN_BUFFERS]

    def buffer_names(self) -> list[str]:
        return [n for n in self.weight_shapes() if n.rsplit(".", 1)[1] in BN_BUFFERS]

    def trainable_param_count(self) -> int:
        shapes = self.weight_shapes()
        return sum(_prod(shapes[n]) for n in self.trainable_names())

    def buffer_count(self) -> int:
        shapes = self.weight_shapes()
        return sum(_prod(shapes[n]) for n in self.buffer_names())

    def macs(self) -> int:
        """Multiply-accumulates of one forward pass for one image (convs and dense)."""
        return sum(l.macs for l in self.layers)

    def embedding_dim(self) -> int:
        """Features per image of the embedding (the input width of ``EMBEDDING_LAYER``)."""
        return self.layer(EMBEDDING_LAYER).params["kernel"][0]

    def layer(self, name: str) -> LayerSpec:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Walker:
    """Tracks the activation shape while layers are appended."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self.h, self.w, self.c = spec.in_shape

    def conv(self, name, out, k=3, stride=1, bias=False, padding=None):
        pad = k // 2 if padding is None else padding
        self.h = (self.h + 2 * pad - k) // stride + 1
        self.w = (self.w + 2 * pad - k) // stride + 1
        params = {"kernel": (k, k, self.c, out)}
        if bias:
            params["bias"] = (out,)
        macs = self.h * self.w * k * k * self.c * out
        self.spec.layers.append(LayerSpec(name, "conv", params, macs))
        self.c = out

    def dwconv(self, name, k=3, stride=1):
        pad = k // 2
        self.h = (self.h + 2 * pad - k) // stride + 1
        self.w = (self.w + 2 * pad - k) // stride + 1
        macs = self.h * self.w * k * k * self.c
        self.spec.layers.append(LayerSpec(name, "dwconv", {"kernel": (k, k, self.c, 1)}, macs))

    def bn(self, name):
        c = self.c
        params = {"gamma": (c,), "beta": (c,), "moving_mean": (c,), "moving_variance": (c,)}
        self.spec.layers.append(LayerSpec(name, "bn", params, spatial=(self.h, self.w)))

    def pool(self, k=2):
        self.h //= k
        self.w //= k

    def global_pool(self):
        self.h = self.w = 1

    def dense(self, name, out, flatten=False):
        hwc = (self.h, self.w, self.c) if flatten else None
        fan_in = self.h * self.w * self.c if flatten else self.c
        params = {"kernel": (fan_in, out), "bias": (out,)}
        self.spec.layers.append(LayerSpec(name, "dense", params, fan_in * out, hwc))
        self.h = self.w = 1
        self.c = out


def seed_cnn(w: _Walker) -> None:
    """3 x (conv3x3 pad 1 + ReLU + maxpool 2) -> flatten -> 1024 -> 512 -> classes."""
    for i, filters in enumerate((64, 128, 256), start=1):
        w.conv(f"conv{i}", filters, bias=True)
        w.pool()
    w.dense("fc1", 1024, flatten=True)
    w.dense("fc2", 512)
    w.dense("head", w.spec.num_classes)


def resnet20(w: _Walker) -> None:
    """He et al. 2016 CIFAR ResNet-20, option-A (parameter-free) shortcuts."""
    w.conv("stem.conv", 16)
    w.bn("stem.bn")
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(3):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"stage{stage}.block{block}"
            w.conv(f"{prefix}.conv1", width, stride=stride)
            w.bn(f"{prefix}.bn1")
            w.conv(f"{prefix}.conv2", width)
            w.bn(f"{prefix}.bn2")
    w.global_pool()
    w.dense("head", w.spec.num_classes)


def resnet18(w: _Walker) -> None:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 1x1 projection shortcuts with BN."""
    w.conv("stem.conv", 64)
    w.bn("stem.bn")
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"stage{stage}.block{block}"
            c_in, h_in, w_in = w.c, w.h, w.w
            w.conv(f"{prefix}.conv1", width, stride=stride)
            w.bn(f"{prefix}.bn1")
            w.conv(f"{prefix}.conv2", width)
            w.bn(f"{prefix}.bn2")
            if stride != 1 or c_in != width:
                c_out, h_out, w_out = w.c, w.h, w.w
                w.c, w.h, w.w = c_in, h_in, w_in
                w.conv(f"{prefix}.shortcut.conv", width, k=1, stride=stride, padding=0)
                w.bn(f"{prefix}.shortcut.bn")
                assert (w.c, w.h, w.w) == (c_out, h_out, w_out)
    w.global_pool()
    w.dense("head", w.spec.num_classes)


VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11_bn(w: _Walker) -> None:
    """VGG-11 with BatchNorm (conv with bias -> BN -> ReLU), CIFAR head 512 -> classes.

    The last max-pool is a global max-pool: identical to a 2x2 pool at 32x32
    (2x2 -> 1x1) and it keeps 28x28 inputs from shrinking to zero.
    """
    index = 0
    for position, item in enumerate(VGG11_CONFIG):
        if item == "M":
            if position == len(VGG11_CONFIG) - 1:
                w.global_pool()
            else:
                w.pool()
            continue
        index += 1
        w.conv(f"block{index}.conv", item, bias=True)
        w.bn(f"block{index}.bn")
    w.dense("head", w.spec.num_classes, flatten=True)


# (expansion t, output channels c, repeats n, first stride s); CIFAR port: the
# second row has stride 1 instead of 2 and the stem has stride 1.
MOBILENET_V2_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_DROPOUT = 0.2  # dropout rate before the classifier
MOBILENET_V2_LAST_CHANNELS = 1280


def mobilenet_v2(w: _Walker) -> None:
    """MobileNetV2 width 1.0 for 32x32: ReLU6, inverted residuals, dropout, linear head.

    A block has an expand 1x1 conv only when t != 1 (as torchvision); the
    residual is added when stride == 1 and input channels == output channels.
    """
    w.conv("stem.conv", 32)
    w.bn("stem.bn")
    index = 0
    for t, c, n, s in MOBILENET_V2_CONFIG:
        for i in range(n):
            prefix = f"block{index}"
            if t != 1:
                w.conv(f"{prefix}.expand.conv", w.c * t, k=1, padding=0)
                w.bn(f"{prefix}.expand.bn")
            w.dwconv(f"{prefix}.depthwise.conv", stride=s if i == 0 else 1)
            w.bn(f"{prefix}.depthwise.bn")
            w.conv(f"{prefix}.project.conv", c, k=1, padding=0)
            w.bn(f"{prefix}.project.bn")
            index += 1
    w.conv("last.conv", MOBILENET_V2_LAST_CHANNELS, k=1, padding=0)
    w.bn("last.bn")
    w.global_pool()
    w.dense("head", w.spec.num_classes)


ARCHITECTURES: dict[str, Callable[[_Walker], None]] = {
    "seed_cnn": seed_cnn,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "vgg11_bn": vgg11_bn,
    "mobilenet_v2": mobilenet_v2,
}

# Trainable parameter counts published for these models at 32x32x3, 10 classes.
PUBLISHED_PARAM_COUNTS = {
    "seed_cnn": 5_096_074,
    "resnet20": 269_722,
    "resnet18": 11_173_962,
}


def arch_spec(model: str, num_classes: int = 10, in_shape: tuple[int, int, int] = (32, 32, 3)) -> ArchSpec:
    """The canonical spec of ``model`` for this input shape (H, W, C) and class count."""
    if model not in ARCHITECTURES:
        from common.errors import ConfigError

        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(ARCHITECTURES)}")
    spec = ArchSpec(model, int(num_classes), tuple(int(d) for d in in_shape))
    ARCHITECTURES[model](_Walker(spec))
    return spec
