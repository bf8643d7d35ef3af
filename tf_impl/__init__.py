"""The TensorFlow/Keras side of dualbench: models, canonical weight I/O, data pipeline, optimizer, backend.

Mirror image of ``torch_impl`` (same file names, same public names). Keras 3
on the TensorFlow backend; models are functional ``keras.Model``s computing in
NHWC (channels_last), the canonical layout itself, so weights and images cross
``common.backend.Backend`` without transposes. This package never imports
torch or torchvision.
"""
