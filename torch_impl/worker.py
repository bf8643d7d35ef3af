"""Worker subprocess for one torch run: ``python -m torch_impl.worker SPEC.json OUT.json``."""
import sys

from common.worker import run_worker

if __name__ == "__main__":
    sys.exit(run_worker("torch"))
