"""Shared building blocks of the Keras models (mirror of torch_impl/layers.py).

Every weight-owning Keras layer is NAMED with its canonical layer name
(``stage1.block0.conv1``, ``block3.expand.bn`` ...): Keras 3 accepts dots in
layer names (it only rejects '/'), so the canonical name -> layer map is
simply ``model.get_layer(name)`` and no name mangling is needed.

Padding: stride-1 3x3 convs use 'same' (symmetric (1, 1) for an odd kernel at
stride 1); 1x1 convs use 'valid'. Strided 3x3 convs (regular and depthwise)
use ``ZeroPadding2D(1)`` + 'valid', because Keras 'same' at stride 2 on an
even input pads (0, 1) where torch pads (1, 1).

BatchNorm: ``BatchNorm`` keeps Keras's BatchNormalization (variables, names,
config) but replaces its ``call``: the moving variance is updated with the
UNBIASED batch variance (torch's convention, which the contract fixes for
both sides), the math runs in float32 through TF's fused kernel, and the
momentum/epsilon come from the recipe (never Keras's 0.99/1e-3 defaults).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import tensorflow as tf
from keras import layers

# The two custom layers are registered so a saved .keras file loads back (tf_impl.export): their
# configs (BatchNormalization's own, and out_channels/stride) rebuild them exactly.
_SERIALIZABLE = keras.saving.register_keras_serializable(package="dualbench")


@_SERIALIZABLE
class BatchNorm(layers.BatchNormalization):
    """Keras BatchNormalization with torch's moving-statistics convention, computed in float32.

    Training: normalise with the biased batch variance (both frameworks do),
    then ``moving = momentum * moving + (1 - momentum) * batch`` with the
    UNBIASED variance ``var * n / (n - 1)``, n = N*H*W (Keras would use the
    biased one). ``momentum`` is Keras's convention (= 1 - torch momentum).
    Under mixed precision the statistics and the normalisation run in float32
    and only the output is cast back to the compute dtype.

    ``update_moving_statistics = False`` keeps batch statistics but skips the
    update (used by ``weights.predict(training=True)``, which must not change
    the model); it is read when the call is traced/run.
    """

    running_variance_estimator = "unbiased"  # read back by the fairness audit
    # How training-mode statistics are computed; read when a call runs/is traced, set per
    # execution mode with ``BatchNorm.using`` (tf_impl.optim._BN_IMPLEMENTATION):
    # "fused": TF's FusedBatchNormV3 kernel (one op forward, one backward: a resnet20 graph-mode
    #   step on the CPU takes 0.19-0.40 s with it vs 0.46-0.54 s with composed ops; it returns
    #   the unbiased batch variance itself).
    # "composed": two-pass tf.nn.moments + elementwise ops, which XLA fuses; used under XLA, whose
    #   lowering of FusedBatchNormV3 computes a one-pass E[x^2] - E[x]^2 variance that cancels
    #   when |mean| >> std (tests/test_tf_models.py has the case).
    implementation = "fused"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_moving_statistics = True

    @classmethod
    @contextlib.contextmanager
    def using(cls, implementation: str) -> Iterator[None]:
        """Trace/run BatchNorm layers with ``implementation`` ("fused" | "composed") inside the block."""
        if implementation not in ("fused", "composed"):
            raise ValueError(f"unknown BatchNorm implementation {implementation!r}")
        previous, cls.implementation = cls.implementation, implementation
        try:
            yield
        finally:
            cls.implementation = previous

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise NotImplementedError("BatchNorm does not support masks")
        x = tf.cast(inputs, tf.float32)  # BN math in float32 whatever the dtype policy
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        if training and self.trainable:
            outputs, mean, unbiased_variance = self._normalize_with_batch_statistics(x, gamma, beta)
            if self.update_moving_statistics:
                keep = float(self.momentum)  # Keras convention: weight of the old value
                self.moving_mean.assign(self.moving_mean * keep + mean * (1.0 - keep))
                self.moving_variance.assign(self.moving_variance * keep + unbiased_variance * (1.0 - keep))
        else:
            mean = tf.cast(self.moving_mean, tf.float32)
            variance = tf.cast(self.moving_variance, tf.float32)
            outputs = (x - mean) * (gamma * tf.math.rsqrt(variance + self.epsilon)) + beta
        return tf.cast(outputs, self.compute_dtype)

    def _normalize_with_batch_statistics(self, x, gamma, beta):
        """(normalised x, batch mean, UNBIASED batch variance); normalised with the biased variance."""
        if self.implementation == "fused":
            # The raw op (what tf.nn.fused_batch_norm wraps) with every attribute explicit.
            outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            return outputs, mean, unbiased_variance
        mean, variance = tf.nn.moments(x, axes=[0, 1, 2])  # biased batch variance
        # (x - mean) * scale, not tf.nn.batch_normalization's x * scale - mean * scale, which
        # cancels catastrophically when |mean| >> std.
        outputs = (x - mean) * (gamma * tf.math.rsqrt(variance + self.epsilon)) + beta
        shape = tf.shape(x)
        count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
        return outputs, mean, variance * (count / (count - 1.0))  # torch's running-variance convention


def batch_norm(momentum: float, epsilon: float, name: str) -> BatchNorm:
    """BatchNorm from the recipe's torch-convention ``momentum`` (Keras momentum = 1 - it) and ``epsilon``.

    Both override Keras defaults (momentum 0.99, epsilon 1e-3).
    """
    return BatchNorm(axis=-1, momentum=1.0 - momentum, epsilon=epsilon, name=name)


def activation(kind: str | None, name: str):
    """ReLU / ReLU6 layer (a separate layer, so a conv's output is observable before it), or None."""
    if kind is None:
        return None
    return layers.ReLU(max_value=6.0 if kind == "relu6" else None, name=name)


def conv2d(x, filters: int, kernel_size: int = 3, stride: int = 1, bias: bool = False, *, name: str):
    """A conv with symmetric padding kernel_size // 2 (explicit ZeroPadding2D when strided)."""
    x, padding = _symmetric_padding(x, kernel_size, stride, name)
    return layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, use_bias=bias,
                         name=name)(x)


def depthwise_conv2d(x, kernel_size: int = 3, stride: int = 1, *, name: str):
    """A depthwise conv (depth multiplier 1, no bias), padded like ``conv2d``."""
    x, padding = _symmetric_padding(x, kernel_size, stride, name)
    return layers.DepthwiseConv2D(kernel_size, strides=stride, padding=padding, use_bias=False,
                                  name=name)(x)


def _symmetric_padding(x, kernel_size: int, stride: int, name: str):
    if kernel_size == 1:
        return x, "valid"
    if stride == 1:
        return x, "same"  # symmetric for an odd kernel at stride 1
    # Keras 'same' would pad (0, 1) here; torch pads (1, 1).
    return layers.ZeroPadding2D(kernel_size // 2, name=f"{name}.pad")(x), "valid"


def conv_bn(x, filters: int, kernel_size: int = 3, stride: int = 1, bias: bool = False,
            act: str | None = "relu", depthwise: bool = False, *, name: str, bn_momentum: float,
            bn_epsilon: float):
    """conv -> BN -> optional activation; layers named ``<name>.conv``, ``<name>.bn`` (canonical names)."""
    if depthwise:
        x = depthwise_conv2d(x, kernel_size, stride, name=f"{name}.conv")
    else:
        x = conv2d(x, filters, kernel_size, stride, bias, name=f"{name}.conv")
    x = batch_norm(bn_momentum, bn_epsilon, f"{name}.bn")(x)
    act_layer = activation(act, f"{name}.{act}")
    return x if act_layer is None else act_layer(x)


@_SERIALIZABLE
class OptionAShortcut(layers.Layer):
    """He et al.'s parameter-free shortcut: take even rows/cols, zero-pad the new channels.

    (out-in)//2 zero channels go before the input channels and the rest after.
    """

    def __init__(self, out_channels: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.stride = int(stride)

    def call(self, x):
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.out_channels - x.shape[-1]
        before = extra // 2
        return tf.pad(x, [[0, 0], [0, 0], [0, 0], [before, extra - before]])

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels, "stride": self.stride}


def basic_block(x, out_channels: int, stride: int, shortcut: str, *, name: str, bn_momentum: float,
                bn_epsilon: float):
    """ResNet basic block: conv1 -> bn1 -> relu -> conv2 -> bn2 -> (+ shortcut) -> relu.

    ``shortcut`` is "A" (option-A, resnet20) or "projection" (1x1 conv + BN
    named ``<name>.shortcut.conv`` / ``.bn``, resnet18); identity when the
    shape does not change.
    """
    bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
    in_channels = x.shape[-1]
    out = conv2d(x, out_channels, 3, stride, name=f"{name}.conv1")
    out = batch_norm(bn_momentum, bn_epsilon, f"{name}.bn1")(out)
    out = layers.ReLU(name=f"{name}.relu1")(out)
    out = conv2d(out, out_channels, 3, 1, name=f"{name}.conv2")
    out = batch_norm(bn_momentum, bn_epsilon, f"{name}.bn2")(out)
    if stride == 1 and in_channels == out_channels:
        residual = x
    elif shortcut == "A":
        residual = OptionAShortcut(out_channels, stride, name=f"{name}.shortcut")(x)
    else:
        residual = conv_bn(x, out_channels, 1, stride, act=None, name=f"{name}.shortcut", **bn)
    out = layers.Add(name=f"{name}.add")([out, residual])
    return layers.ReLU(name=f"{name}.relu2")(out)


def inverted_residual(x, out_channels: int, stride: int, expansion: int, *, name: str,
                      bn_momentum: float, bn_epsilon: float):
    """MobileNetV2 block: [expand 1x1 -> BN -> ReLU6] -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN.

    The expand stage exists only when ``expansion != 1``; the residual is
    added when stride == 1 and the channel count is unchanged.
    """
    bn = {"bn_momentum": bn_momentum, "bn_epsilon": bn_epsilon}
    in_channels = x.shape[-1]
    out = x
    if expansion != 1:
        out = conv_bn(out, in_channels * expansion, 1, act="relu6", name=f"{name}.expand", **bn)
    out = conv_bn(out, None, 3, stride, act="relu6", depthwise=True, name=f"{name}.depthwise", **bn)
    out = conv_bn(out, out_channels, 1, act=None, name=f"{name}.project", **bn)
    if stride == 1 and in_channels == out_channels:
        out = layers.Add(name=f"{name}.add")([x, out])
    return out


def dense(x, units: int, *, name: str):
    """A dense layer with bias (its output observable before any activation)."""
    return layers.Dense(units, name=name)(x)



def global_max_pool(x, *, name: str):
    """Max over H and W -> (N, C) (torch's side keeps (N, C, 1, 1) and flattens)."""
    return layers.GlobalMaxPooling2D(name=name)(x)
