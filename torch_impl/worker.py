"""Worker subprocess for one torch run: ``python -m torch_impl.worker SPEC.json OUT.json``."""
import sys

from common.worker import run_worker

if __name__ == "__main__":
    sys.exit(run_worker("torch"))

# The mirrored public API (tests/test_mirror.py): the same names in torch_impl/ and tf_impl/.
__all__ = []
