"""Fairness-audit read-backs of the Keras objects, shared by both Keras backends.

Every value is read from the built Keras objects (layers, the optimizer the
step applies, its loss-scale wrapper), never from the recipe; the backend
packages add what is theirs (threads, device, precision, pipelines).
"""
from __future__ import annotations

import math
from typing import Any

import keras

from common.audit import decay_settings, single_value
from keras_impl.layers import BatchNorm
from keras_impl.optim import inner_optimizer


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer, nested models' layers included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += all_layers(layer)
    return found


def layer_settings(model: keras.Model) -> dict[str, Any]:
    """BN momentum (torch convention), epsilon, variance estimator of every BN layer; dropout rate."""
    layers = all_layers(model)
    bns = [l for l in layers if isinstance(l, BatchNorm)]
    # 12 significant digits: 1 - (1 - 0.1) is 0.09999999999999998 in binary floating point.
    return {"bn_momentum": single_value(float(f"{1.0 - l.momentum:.12g}") for l in bns),
            "bn_epsilon": single_value(float(l.epsilon) for l in bns),
            "bn_running_variance": single_value(l.running_variance_estimator for l in bns),
            "dropout": single_value(float(l.rate) for l in layers if isinstance(l, keras.layers.Dropout))}


def optimizer_settings(optimizer: keras.optimizers.Optimizer) -> dict[str, Any]:
    """Hyperparameters and decayed parameters read from the built optimizer (never from the recipe)."""
    inner = inner_optimizer(optimizer)
    is_sgd = inner.kind == "sgd"
    decayed = [name for name, flag in zip(inner.variable_names, inner.decay_flags)
               if flag and inner.decay_coefficient != 0]
    if is_sgd:
        name = "sgd"
    else:
        name = "adamw" if inner.decay_mode == "decoupled" else "adam"
    return {"optimizer": name,
            "momentum": float(inner.sgd_momentum) if is_sgd else None,
            "nesterov": bool(inner.nesterov) if is_sgd else None,
            "adam_beta1": None if is_sgd else float(inner.beta_1),
            "adam_beta2": None if is_sgd else float(inner.beta_2),
            "optimizer_epsilon": None if is_sgd else float(inner.adam_epsilon),
            "weight_decay": float(inner.decay_coefficient) if decayed else 0.0,
            "weight_decay_mode": inner.decay_mode if decayed else None,
            **decay_settings(decayed, inner.variable_names)}


def loss_scale_settings(optimizer: keras.optimizers.Optimizer) -> str | None:
    """fp16 dynamic loss scaling as the LossScaleOptimizer holds it; None without one."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    # initial_scale: what dynamic_scale started from (dynamic_scale itself moves during training)
    return (f"dynamic (initial scale {float(optimizer.initial_scale):g}, "
            f"growth interval {int(optimizer.dynamic_growth_steps)} steps)")


def strided_padding(model: keras.Model) -> str:
    """'symmetric' iff every k>1 conv pads k//2 on every side, read from the layers.

    Stride 1: Keras 'same' (symmetric for an odd kernel). Strided: 'valid'
    after a ZeroPadding2D of ((k//2, k//2), (k//2, k//2)). 1x1 convs: 'valid'.
    """
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)]
    for layer in convs:
        kernel, stride, pad = max(layer.kernel_size), max(layer.strides), layer.kernel_size[0] // 2
        if kernel == 1:
            ok = layer.padding == "valid"
        elif stride == 1:
            ok = layer.padding == "same" and kernel % 2 == 1
        else:
            source = layer._inbound_nodes[0].parent_nodes[0].operation  # the layer feeding this conv
            ok = (layer.padding == "valid" and isinstance(source, keras.layers.ZeroPadding2D)
                  and tuple(map(tuple, source.padding)) == ((pad, pad), (pad, pad)))
        if not ok:
            return f"asymmetric ({layer.name}: padding={layer.padding!r}, stride {stride})"
    return "symmetric"


def model_settings(model: keras.Model, train_step: Any) -> dict[str, Any]:
    """Everything the Keras objects of a run say: layers, padding, optimizer, loss, loss scaling, style."""
    return {**layer_settings(model), "strided_conv_padding": strided_padding(model),
            **optimizer_settings(train_step.optimizer), "trainable_params": trainable_param_count(model),
            "loss": train_step.loss.name, "label_smoothing": float(train_step.loss.label_smoothing),
            "loss_scaling": loss_scale_settings(train_step.optimizer), "execution_mode": train_step.mode,
            "execution_style": train_step.style}


def trainable_param_count(model: keras.Model) -> int:
    """Trainable values of the built model."""
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))
