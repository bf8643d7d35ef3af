"""The TensorFlow/Keras side of dualbench: models, canonical weight I/O, data pipeline, optimizer, backend.

Mirror image of ``torch_impl`` (same file names, same public names). Keras 3
on the TensorFlow backend; models are functional ``keras.Model``s computing in
NHWC (channels_last), the canonical layout itself, so weights and images cross
``common.backend.Backend`` without transposes. This package never imports
torch or torchvision.
"""
import os as _os
import sys as _sys

from common.errors import UserError as _UserError

_KERAS_BACKEND = "tensorflow"  # the one place the TensorFlow side chooses Keras's backend


def _choose_keras_backend() -> None:
    """Keras 3 picks its backend at its first import: set it before any tf_impl module imports keras.

    A different KERAS_BACKEND in the user's environment, or keras already loaded on
    another backend in this process, is an error (never silently used).
    """
    requested = _os.environ.get("KERAS_BACKEND")
    if requested and requested != _KERAS_BACKEND:
        raise _UserError(f"KERAS_BACKEND={requested} is set, but the tensorflow backend runs Keras on "
                         f"TensorFlow: unset KERAS_BACKEND (dualbench chooses Keras's backend per worker)")
    _os.environ["KERAS_BACKEND"] = _KERAS_BACKEND
    keras = _sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend") and keras.backend.backend() != _KERAS_BACKEND:
        raise _UserError(f"keras was already imported on the {keras.backend.backend()} backend in this process: "
                         "run the tensorflow backend in its own process")


_choose_keras_backend()
