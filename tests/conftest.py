"""Session-wide test setup.

Importing tensorflow and THEN torchvision or triton in one process segfaults
on these machines (exit 139). Tests of both backends share one pytest
process, so torch and triton (which torch.compile may load) are imported
first, before any test can import tensorflow. The real runs never mix them:
each backend runs in its own worker subprocess.
"""
import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tf_impl  # noqa: F401  (sets KERAS_BACKEND before keras loads)

for _name in ("torch", "triton"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
