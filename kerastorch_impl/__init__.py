"""The Keras-on-PyTorch side of dualbench (backend ``keras-torch``): Keras 3 with ``KERAS_BACKEND=torch``.

Mirror image of ``torch_impl`` and ``tf_impl`` (same file names, same public
names). The models, BatchNorm, optimizer and weight I/O are keras_impl's, the
very code ``tf_impl`` runs on TensorFlow; what is PyTorch's lives here: the
input pipeline (torch_impl's, handing over NHWC tensors), the training step
(torch autograd, ``torch.compile`` for the ``jit_compile`` mode, as Keras's
own ``jit_compile=True`` does on this backend), torch's fused BatchNorm kernel,
CUDA synchronisation and memory figures. Keras chooses its backend once per
process, so keras-torch always runs in its own worker process; this package
never imports tensorflow.
"""
from keras_impl import choose_keras_backend as _choose_keras_backend

_KERAS_BACKEND = "torch"  # the one place the Keras-on-PyTorch side chooses Keras's backend

_choose_keras_backend(_KERAS_BACKEND, "keras-torch")
