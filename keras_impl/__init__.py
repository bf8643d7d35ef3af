"""The Keras 3 code that both Keras backends share: models, layers, optimizer, weight I/O, audit, ``fit``.

Written in ``keras`` and ``keras.ops`` only (plus numpy and ``common``): this
package never imports tensorflow or torch and never chooses Keras's backend.
The backend packages do: ``tf_impl`` (Keras on TensorFlow) and
``kerastorch_impl`` (Keras on PyTorch) each set ``KERAS_BACKEND`` in their
``__init__`` and then use this code unchanged, so one model definition, one
BatchNorm and one optimizer serve both - Keras 3's promise, measured.

What differs per backend stays with the backend package: the input pipeline,
the compiled training step (tf.GradientTape + tf.function/XLA; torch autograd
+ torch.compile), synchronisation, memory figures and the optional fused
BatchNorm kernel each installs (``layers.BatchNorm.install_fused_kernel``).
"""
import os as _os
import sys as _sys

from common.errors import UserError as _UserError


def choose_keras_backend(keras_backend: str, dualbench_backend: str) -> None:
    """Keras 3 picks its backend at its first import: set it before any module of the calling
    backend package imports keras (each package's ``__init__`` calls this once).

    A different KERAS_BACKEND in the user's environment, or keras already loaded on
    another backend in this process, is an error (never silently used).
    """
    requested = _os.environ.get("KERAS_BACKEND")
    if requested and requested != keras_backend:
        raise _UserError(f"KERAS_BACKEND={requested} is set, but the {dualbench_backend} backend runs Keras on "
                         f"{keras_backend}: unset KERAS_BACKEND (dualbench chooses Keras's backend per worker)")
    _os.environ["KERAS_BACKEND"] = keras_backend
    keras = _sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend") and keras.backend.backend() != keras_backend:
        raise _UserError(f"keras was already imported on the {keras.backend.backend()} backend in this process: "
                         f"run the {dualbench_backend} backend in its own process")
