"""The five CNNs as functional Keras models, for every Keras backend (mirror of torch_impl/models.py).

Layer names are the canonical layer names of common.architectures with "_" for
"." (keras_impl.layers.keras_layer_name), so
``model.get_layer(keras_layer_name("stage2.block0.conv1"))`` is that layer. Every builder takes
``(num_classes, in_shape, bn_momentum, bn_epsilon)`` with ``in_shape`` NHWC
``(H, W, C)``; ``create_model`` attaches the model's ``arch_spec``. Models
return logits (no softmax) in the compute dtype of the global Keras policy.
Initial values come from common.init via ``set_weights``; Keras's own
initialisers are overwritten.
"""
from __future__ import annotations

import keras
from keras import layers

from common.architectures import (MOBILENET_V2_CONFIG, MOBILENET_V2_DROPOUT,
                                  MOBILENET_V2_LAST_CHANNELS, VGG11_CONFIG, arch_spec)
from common.registry import ModelRegistry
from keras_impl.layers import (basic_block, conv2d, conv_bn, dense, global_max_pool, inverted_residual,
                               keras_layer_name)

MODELS = ModelRegistry("keras")  # the same builders on every Keras backend


def _inputs(in_shape: tuple[int, int, int]):
    return keras.Input(shape=tuple(in_shape), dtype="float32", name="images")


@MODELS.register("seed_cnn")
def seed_cnn(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """3 x (conv3x3 with bias -> ReLU -> maxpool 2) -> flatten -> fc1 1024 -> fc2 512 -> head.

    No BatchNorm: the BN arguments are accepted and unused.
    """
    inputs = _inputs(in_shape)
    x = inputs
    for index, filters in enumerate((64, 128, 256), start=1):
        x = conv2d(x, filters, 3, 1, bias=True, name=f"conv{index}")
        x = layers.ReLU(name=f"relu{index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)  # 'valid' = floor, as torch
    x = layers.Flatten(name="flatten")(x)  # NHWC flatten order = the canonical fc1 row order
    x = layers.ReLU(name=keras_layer_name("fc1.relu"))(dense(x, 1024, name="fc1"))
    x = layers.ReLU(name=keras_layer_name("fc2.relu"))(dense(x, 512, name="fc2"))
    return keras.Model(inputs, dense(x, num_classes, name="head"), name="seed_cnn")


def _cifar_resnet(name: str, num_classes: int, in_shape, widths: tuple[int, ...], blocks_per_stage: int,
                  shortcut: str, bn_momentum: float, bn_epsilon: float) -> keras.Model:
    """stem conv-BN-ReLU -> stages of basic blocks -> global average pool -> dense head.

    The first block of every stage after the first has stride 2.
    """
    bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
    inputs = _inputs(in_shape)
    x = conv_bn(inputs, widths[0], name="stem", **bn)
    for stage, width in enumerate(widths, start=1):
        for index in range(blocks_per_stage):
            stride = 2 if stage > 1 and index == 0 else 1
            x = basic_block(x, width, stride, shortcut, name=f"stage{stage}.block{index}", **bn)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, dense(x, num_classes, name="head"), name=name)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """He et al. 2016 CIFAR ResNet-20 with option-A shortcuts."""
    return _cifar_resnet("resnet20", num_classes, in_shape, (16, 32, 64), 3, "A", bn_momentum, bn_epsilon)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, projection shortcuts."""
    return _cifar_resnet("resnet18", num_classes, in_shape, (64, 128, 256, 512), 2, "projection",
                         bn_momentum, bn_epsilon)


@MODELS.register("vgg11_bn")
def vgg11_bn(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
             bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """VGG-11 (conv with bias -> BN -> ReLU, max-pools), last pool global max, dense head."""
    inputs = _inputs(in_shape)
    x, index, last = inputs, 0, len(VGG11_CONFIG) - 1
    for position, item in enumerate(VGG11_CONFIG):
        if item == "M":
            # The last pool is global: equal to 2x2 at 32x32, and 28x28 inputs do not shrink to zero.
            pool = f"pool{position}"
            x = global_max_pool(x, name=pool) if position == last else layers.MaxPooling2D(2, name=pool)(x)
            continue
        index += 1
        x = conv_bn(x, item, bias=True, name=f"block{index}", bn_momentum=bn_momentum,
                    bn_epsilon=bn_epsilon)
    return keras.Model(inputs, dense(x, num_classes, name="head"), name="vgg11_bn")


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
                 bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """MobileNetV2 width 1.0, CIFAR strides (stride-1 stem), dropout before the head."""
    bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
    inputs = _inputs(in_shape)
    x = conv_bn(inputs, 32, act="relu6", name="stem", **bn)
    index = 0
    for expansion, out_channels, repeats, first_stride in MOBILENET_V2_CONFIG:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            x = inverted_residual(x, out_channels, stride, expansion, name=f"block{index}", **bn)
            index += 1
    x = conv_bn(x, MOBILENET_V2_LAST_CHANNELS, 1, act="relu6", name="last", **bn)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(MOBILENET_V2_DROPOUT if dropout is None else dropout, name="dropout")(x)
    return keras.Model(inputs, dense(x, num_classes, name="head"), name="mobilenet_v2")


def create_model(name: str, num_classes: int = 10, in_shape: tuple[int, int, int] = (32, 32, 3),
                 bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> keras.Model:
    """Build ``name`` (NHWC, under the current Keras dtype policy) and attach its canonical ``arch_spec``."""
    in_shape = tuple(int(d) for d in in_shape)
    model = MODELS.create(name, num_classes=int(num_classes), in_shape=in_shape,
                          bn_momentum=float(bn_momentum), bn_epsilon=float(bn_epsilon), dropout=dropout)
    model.arch_spec = arch_spec(name, num_classes, in_shape)
    return model

