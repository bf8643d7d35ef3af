"""The PyTorch side of dualbench: models, canonical weight I/O, data pipeline, optimizer, backend.

Mirror image of ``tf_impl`` (same file names, same public names). Models
compute in NCHW (optionally in channels_last memory format); everything that
crosses ``common.backend.Backend`` is numpy in the canonical NHWC/HWIO layout.
"""
