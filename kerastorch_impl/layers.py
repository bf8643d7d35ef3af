"""The Keras layers on PyTorch (mirror of torch_impl/layers.py): keras_impl's, plus torch's fused BatchNorm kernel.

The building blocks are keras_impl/layers.py's, the same code on both Keras
backends. What is PyTorch's own is the fast path of BatchNorm's training
mode: torch's batch_norm kernel, installed here as ``BatchNorm``'s fused kernel
and chosen per execution mode in kerastorch_impl/optim.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from keras_impl.layers import (BatchNorm, OptionAShortcut, activation, basic_block, batch_norm, conv2d,  # noqa: F401
                               conv_bn, dense, depthwise_conv2d, global_max_pool, inverted_residual)


def _fused_batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, epsilon: float):
    """(outputs, batch mean, UNBIASED batch variance) of NHWC ``x`` from torch's batch_norm kernel.

    torch's kernel normalises with the biased batch variance and moves its running
    buffers towards the UNBIASED one; with momentum 1 and fresh buffers those
    buffers come back holding exactly the batch mean and the unbiased variance.
    The NHWC tensor is handed over as an NCHW view in channels_last memory
    format, which torch's kernels take without a copy.
    """
    channels = x.shape[-1]
    mean = torch.zeros(channels, dtype=torch.float32, device=x.device)
    unbiased_variance = torch.ones(channels, dtype=torch.float32, device=x.device)
    outputs = F.batch_norm(x.permute(0, 3, 1, 2), mean, unbiased_variance, gamma, beta, training=True,
                           momentum=1.0, eps=epsilon)
    return outputs.permute(0, 2, 3, 1), mean, unbiased_variance


BatchNorm.install_fused_kernel(_fused_batch_norm)
