"""Canonical weight I/O, numpy inference and per-layer activations, for every Keras backend
(mirror of torch_impl/weights.py through tf_impl/weights.py and kerastorch_impl/weights.py).

The canonical layout IS Keras's (conv HWIO, depthwise (kh, kw, C, 1), dense
(in, out), NHWC flatten order, BN gamma/beta/moving_mean/moving_variance), so
no array is transposed here: this module maps canonical names to Keras
variables and asserts every shape before a copy.

``training=True`` forwards (parity checks) use BN batch statistics but must
leave the model unchanged and deterministic: ``inference`` turns
the BN moving-statistics update and dropout off for the duration of an eager
call.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import numpy as np
from keras import ops

from common.architectures import EMBEDDING_LAYER, ArchSpec, LayerSpec
from common.weights import WeightLayoutError, check_weights
from keras_impl.layers import BatchNorm, keras_layer_name

# canonical parameter suffix -> Keras attribute of the layer (the depthwise kernel is also `kernel`)
_ATTRIBUTE = {"kernel": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
                   "moving_mean": "moving_mean", "moving_variance": "moving_variance"}
_LAYER_TYPE = {"conv": keras.layers.Conv2D, "dwconv": keras.layers.DepthwiseConv2D,
                    "dense": keras.layers.Dense, "bn": BatchNorm}
PREDICT_CHUNK = 1000  # images per eval-mode forward in predict (bounds memory, no effect on results)


def canonical_layers(model: keras.Model, spec: ArchSpec) -> dict[str, keras.layers.Layer]:
    """Canonical layer name -> Keras layer, checking kinds and that no weight is left unmapped."""
    found = {}
    for layer in spec.layers:
        try:
            keras_layer = model.get_layer(keras_layer_name(layer.name))
        except ValueError as exc:
            raise WeightLayoutError(f"{spec.model}: no Keras layer named {layer.name!r}") from exc
        expected = _LAYER_TYPE[layer.kind]
        # Conv2D is a base of nothing else we use, but DepthwiseConv2D is not a Conv2D: check exactly.
        if type(keras_layer) is not expected:
            raise WeightLayoutError(f"{layer.name}: expected {expected.__name__}, "
                                    f"found {type(keras_layer).__name__}")
        found[layer.name] = keras_layer
    mapped = {id(getattr(found[l.name], _ATTRIBUTE[p])) for l in spec.layers for p in l.params}
    unmapped = [v.path for v in model.weights if id(v) not in mapped]
    if unmapped:
        raise WeightLayoutError(f"{spec.model}: Keras weights outside the canonical spec: {unmapped[:5]}")
    return found


def canonical_variables(model: keras.Model, spec: ArchSpec) -> dict[str, tuple[LayerSpec, keras.Variable]]:
    """Canonical weight name -> (its LayerSpec, the live Keras variable)."""
    found = canonical_layers(model, spec)
    return {f"{l.name}.{p}": (l, getattr(found[l.name], _ATTRIBUTE[p]))
            for l in spec.layers for p in l.params}


def trainable_variable_names(model: keras.Model, spec: ArchSpec) -> list[str]:
    """Canonical names of ``model.trainable_variables``, in that order (what the optimizer is built on)."""
    names = {id(variable): name for name, (_, variable) in canonical_variables(model, spec).items()}
    return [names[id(variable)] for variable in model.trainable_variables]


def get_weights(model: keras.Model, spec: ArchSpec) -> dict[str, np.ndarray]:
    """Every canonical weight (trainable and BN statistics) as float32 numpy (copies)."""
    weights = {}
    for name, (layer, variable) in canonical_variables(model, spec).items():
        array = np.array(to_numpy(variable), dtype=np.float32, copy=True)
        if array.shape != layer.params[name.rsplit(".", 1)[1]]:
            raise WeightLayoutError(f"{name}: Keras shape {array.shape}, spec {layer.params}")
        weights[name] = array
    return weights


def set_weights(model: keras.Model, spec: ArchSpec, weights: dict[str, np.ndarray]) -> None:
    """Copy canonical weights in (bit-exact for float32); every shape is asserted before its copy."""
    check_weights(spec, weights)
    for name, (_layer, variable) in canonical_variables(model, spec).items():
        array = np.asarray(weights[name], np.float32)
        if tuple(array.shape) != tuple(variable.shape):
            raise WeightLayoutError(f"{name}: canonical shape {array.shape}, Keras variable {tuple(variable.shape)}")
        variable.assign(array)


@contextlib.contextmanager
def inference(model: keras.Model, training: bool) -> Iterator[None]:
    """Forward context of predict/layer_outputs: with ``training``, calls made with ``training=True``
    use BN batch statistics with no update and no dropout; without it, nothing changes.

    Works for eager calls (the flags are Python attributes read at call time).
    """
    if not training:
        yield
        return
    bns = [l for l in model.layers if isinstance(l, BatchNorm)]
    dropouts = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
    rates = [d.rate for d in dropouts]
    try:
        for bn in bns:
            bn.update_moving_statistics = False
        for d in dropouts:
            d.rate = 0.0  # Dropout.call skips masking when rate == 0
        yield
    finally:
        for bn in bns:
            bn.update_moving_statistics = True
        for d, rate in zip(dropouts, rates):
            d.rate = rate


def predict(model: keras.Model, images: np.ndarray, training: bool = False) -> np.ndarray:
    """float32 logits for NHWC float32 ``images``.

    Eval mode runs in chunks; training mode (batch statistics) runs the whole
    array as one batch, since the statistics depend on the batch.
    """
    images = np.asarray(images, np.float32)
    if training:
        with inference(model, training=True):
            return to_numpy(model(images, training=True))
    chunks = [to_numpy(model(images[i:i + PREDICT_CHUNK], training=False))
              for i in range(0, len(images), PREDICT_CHUNK)]
    return np.concatenate(chunks)


def embed(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """float32 (N, D) penultimate-layer features: the input of the classifier (EMBEDDING_LAYER), eval mode."""
    probe = keras.Model(model.input, model.get_layer(keras_layer_name(EMBEDDING_LAYER)).input)  # shared layers
    images = np.asarray(images, np.float32)
    chunks = [to_numpy(probe(images[i:i + PREDICT_CHUNK], training=False))
              for i in range(0, len(images), PREDICT_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def layer_outputs(model: keras.Model, spec: ArchSpec, images: np.ndarray,
                  training: bool = False) -> dict[str, np.ndarray]:
    """Output of every weight-owning layer (conv before its BN, BN before its activation, dense), NHWC numpy."""
    names = [l.name for l in spec.layers]
    probe = keras.Model(model.input, [model.get_layer(keras_layer_name(n)).output for n in names])  # shared layers
    images = np.asarray(images, np.float32)
    with inference(model, training):
        outputs = probe(images, training=training)
    return {name: to_numpy(value) for name, value in zip(names, outputs)}


def to_numpy(value, dtype=np.float32) -> np.ndarray:
    """numpy of a tensor or a Keras variable, on any Keras backend (a torch tensor: detached, on the host)."""
    if isinstance(value, keras.Variable):
        return np.asarray(value.numpy(), dtype)  # (convert_to_numpy of a tf.Variable warns under numpy 2)
    return np.asarray(ops.convert_to_numpy(value), dtype)

