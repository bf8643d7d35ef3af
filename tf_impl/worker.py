"""``python -m tf_impl.worker SPEC.json OUT.json``: one TensorFlow run (common.worker does the work)."""
import sys

from common.worker import run_worker

if __name__ == "__main__":
    sys.exit(run_worker("tensorflow"))

# The mirrored public API (tests/test_mirror.py): the same names in torch_impl/ and tf_impl/.
__all__ = []
