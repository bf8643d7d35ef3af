"""The five CNNs on Keras/PyTorch (mirror of torch_impl/models.py): keras_impl/models.py's builders.

The functional Keras models are written once, in keras.ops, for both Keras
backends (keras_impl/models.py); importing kerastorch_impl.layers first
installs torch's fused BatchNorm kernel.
"""
from kerastorch_impl import layers as _layers  # noqa: F401  (installs the fused BatchNorm kernel)
from keras_impl.models import MODELS, create_model, mobilenet_v2, resnet18, resnet20, seed_cnn, vgg11_bn  # noqa: F401
