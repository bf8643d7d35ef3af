"""The Keras layers on TensorFlow (mirror of torch_impl/layers.py): keras_impl's, plus TF's fused BatchNorm kernel.

The building blocks are keras_impl/layers.py's, the same code on both Keras
backends. What is TensorFlow's own is the fast path of BatchNorm's training
mode: TF's FusedBatchNormV3 kernel (one op forward, one backward), installed
here as ``BatchNorm``'s fused kernel and chosen per execution mode in
tf_impl/optim.py (XLA uses the composed keras.ops formula instead: its
lowering of FusedBatchNormV3 computes a one-pass E[x^2] - E[x]^2 variance that
cancels when |mean| >> std; tests/test_tf_models.py has the case).
"""
from __future__ import annotations

import tensorflow as tf

from keras_impl.layers import (BatchNorm, OptionAShortcut, activation, basic_block, batch_norm, conv2d,  # noqa: F401
                               conv_bn, dense, depthwise_conv2d, global_max_pool, inverted_residual)


def _fused_batch_norm(x, gamma, beta, epsilon: float):
    """(outputs, batch mean, UNBIASED batch variance) from TF's fused kernel (it returns that variance itself)."""
    # The raw op (what tf.nn.fused_batch_norm wraps) with every attribute explicit.
    outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
        epsilon=epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    return outputs, mean, unbiased_variance


BatchNorm.install_fused_kernel(_fused_batch_norm)
