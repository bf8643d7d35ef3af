"""Canonical weight I/O, numpy inference and per-layer activations on Keras/TensorFlow (mirror of
torch_impl/weights.py): keras_impl/weights.py's, the same code on both Keras backends.

The canonical layout IS Keras's (conv HWIO, depthwise (kh, kw, C, 1), dense
(in, out), NHWC flatten order), so nothing is transposed.
"""
from keras_impl.weights import (PREDICT_CHUNK, canonical_layers, canonical_variables, embed, get_weights,  # noqa: F401
                                inference, layer_outputs, predict, set_weights, trainable_variable_names)
