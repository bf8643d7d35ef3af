"""The TensorFlow/Keras side of dualbench: models, canonical weight I/O, data pipeline, optimizer, backend.

Mirror image of ``torch_impl`` (same file names, same public names). Keras 3
on the TensorFlow backend; the models, BatchNorm, optimizer and weight I/O are
keras_impl's (keras.ops, shared with ``kerastorch_impl``), computing in NHWC
(channels_last), the canonical layout itself, so weights and images cross
``common.backend.Backend`` without transposes. What is TensorFlow's own lives
here: tf.data pipelines, GradientTape steps under tf.function/XLA, the fused
BatchNorm kernel, device placement and memory figures. This package never
imports torch or torchvision.
"""
from keras_impl import choose_keras_backend as _choose_keras_backend

_KERAS_BACKEND = "tensorflow"  # the one place the TensorFlow side chooses Keras's backend

_choose_keras_backend(_KERAS_BACKEND, "tensorflow")
