"""The PyTorch worker process: ``python -m torch_impl.worker TASK ARGS`` (tasks: common.worker.TASKS).

Every process dualbench starts for the torch side (a training run, its
audit, a bench measurement, a parity phase) starts here.
"""
import sys

from common.worker import main

if __name__ == "__main__":
    sys.exit(main("torch"))
