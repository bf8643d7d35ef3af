"""The Keras-on-PyTorch worker process: ``python -m kerastorch_impl.worker TASK ARGS`` (tasks: common.worker.TASKS).

Every process dualbench starts for the keras-torch backend (a training run,
its audit, a bench measurement, a parity phase) starts here; the package's
``__init__`` (imported first by ``-m``) sets KERAS_BACKEND=torch for it.
"""
import sys

from common.worker import main

if __name__ == "__main__":
    sys.exit(main("keras-torch"))
