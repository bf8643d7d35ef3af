"""Canonical weight I/O, numpy inference and per-layer activations (mirror of tf_impl/weights.py).

Layout conversions go strictly through ``common.weights.to_torch`` /
``from_torch`` (which own the HWIO <-> OIHW transposes and the NHWC flatten
permutation); this module only maps canonical names to torch tensors and
asserts shapes before every copy.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from common.architectures import EMBEDDING_LAYER, ArchSpec, LayerSpec
from common.weights import WeightLayoutError, check_weights, from_torch, to_torch

# canonical parameter suffix -> torch attribute of the module
_ATTRIBUTE = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                   "moving_mean": "running_mean", "moving_variance": "running_var"}
PREDICT_CHUNK = 1000  # images per eval-mode forward in predict (bounds memory, no effect on results)


def _check_kind(layer: LayerSpec, module: nn.Module) -> None:
    if layer.kind == "conv":
        ok = isinstance(module, nn.Conv2d) and module.groups == 1
    elif layer.kind == "dwconv":
        ok = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
    elif layer.kind == "dense":
        ok = isinstance(module, nn.Linear)
    else:
        ok = isinstance(module, nn.BatchNorm2d)
    if not ok:
        raise WeightLayoutError(f"{layer.name}: expected a {layer.kind} layer, found {type(module).__name__}")


def canonical_layers(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Canonical layer name -> module, checking kinds and that no trainable tensor is left unmapped."""
    modules = {}
    for layer in spec.layers:
        try:
            module = model.get_submodule(layer.name)
        except AttributeError as exc:
            raise WeightLayoutError(f"{spec.model}: no module at canonical path {layer.name!r}") from exc
        _check_kind(layer, module)
        modules[layer.name] = module
    mapped = {id(t) for l in spec.layers for p in l.params
              for t in [getattr(modules[l.name], _ATTRIBUTE[p])]}
    unmapped = [n for n, p in model.named_parameters() if id(p) not in mapped]
    if unmapped:
        raise WeightLayoutError(f"{spec.model}: torch parameters outside the canonical spec: {unmapped[:5]}")
    return modules


def canonical_variables(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[LayerSpec, str, torch.Tensor]]:
    """Canonical weight name -> (its LayerSpec, param suffix, the live torch tensor)."""
    modules = canonical_layers(model, spec)
    return {f"{l.name}.{p}": (l, p, getattr(modules[l.name], _ATTRIBUTE[p]))
            for l in spec.layers for p in l.params}


def get_weights(model: nn.Module, spec: ArchSpec) -> dict[str, np.ndarray]:
    """Every canonical weight (trainable and BN statistics) as float32 numpy in the canonical layout."""
    weights = {}
    for name, (layer, param, tensor) in canonical_variables(model, spec).items():
        array = tensor.detach().float().contiguous().cpu().numpy()  # contiguous: channels_last kernels
        weights[name] = from_torch(layer, param, array)
    return weights


def set_weights(model: nn.Module, spec: ArchSpec, weights: dict[str, np.ndarray]) -> None:
    """Copy canonical weights in (exact for float32); every shape is asserted before its copy."""
    check_weights(spec, weights)
    tensors = canonical_variables(model, spec)
    with torch.no_grad():
        for name, (layer, param, tensor) in tensors.items():
            array = to_torch(layer, param, np.asarray(weights[name], np.float32))
            if tuple(array.shape) != tuple(tensor.shape):
                raise WeightLayoutError(f"{name}: torch layout {array.shape} != module tensor {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(array))  # copy_ keeps the tensor's memory format and device


def trainable_variable_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Canonical names of ``model.parameters()``, in that order (the order the optimizer sees them)."""
    names = {id(tensor): name for name, (_, _, tensor) in canonical_variables(model, spec).items()}
    return [names[id(parameter)] for parameter in model.parameters() if parameter.requires_grad]


def _uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's conv kernels are stored channels_last (read back from the tensors)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.shape[1] * module.weight.shape[2] > 1:
            return module.weight.is_contiguous(memory_format=torch.channels_last)
    return False


def _to_model_input(model: nn.Module, images_nhwc: np.ndarray) -> torch.Tensor:
    """NHWC float32 numpy -> NCHW tensor on the model's device, in the model's memory format."""
    parameter = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc, np.float32)).to(parameter.device)
    x = x.permute(0, 3, 1, 2)  # an NHWC buffer viewed as NCHW is already channels_last
    return x.contiguous(memory_format=torch.channels_last if _uses_channels_last(model) else torch.contiguous_format)


@contextlib.contextmanager
def inference(model: nn.Module, training: bool) -> Iterator[None]:
    """No-grad forward context: BN in batch-statistics mode iff ``training``, dropout always off.

    In training mode BN would update its running statistics; they are
    snapshotted and restored so the call leaves the model unchanged.
    """
    modes = {m: m.training for m in model.modules()}
    buffers = [b.detach().clone() for b in model.buffers()] if training else None
    model.train(training)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # dropout masks come from framework RNGs that cannot match
    try:
        with torch.no_grad():
            yield
    finally:
        if buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
        for module, mode in modes.items():
            module.training = mode


def predict(model: nn.Module, images_nhwc: np.ndarray, training: bool = False) -> np.ndarray:
    """float32 logits for NHWC images, computed in float32 (no autocast)."""
    # Eval mode may run in chunks; training mode must not (chunks would change the batch statistics).
    chunk = len(images_nhwc) if training else PREDICT_CHUNK
    outputs = []
    with inference(model, training):
        for start in range(0, len(images_nhwc), max(chunk, 1)):
            logits = model(_to_model_input(model, images_nhwc[start:start + chunk]))
            outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def embed(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    """float32 (N, D) penultimate-layer features: the input of the classifier (EMBEDDING_LAYER), eval mode."""
    captured: list[np.ndarray] = []

    def keep_input(_module, inputs):
        captured.append(inputs[0].detach().float().cpu().numpy())

    handle = model.get_submodule(EMBEDDING_LAYER).register_forward_pre_hook(keep_input)
    try:
        with inference(model, False):
            for start in range(0, len(images_nhwc), PREDICT_CHUNK):
                model(_to_model_input(model, images_nhwc[start:start + PREDICT_CHUNK]))
    finally:
        handle.remove()
    return np.concatenate(captured) if captured else np.zeros((0, 0), np.float32)


def _to_nhwc_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().float()
    if tensor.dim() == 4:
        tensor = tensor.permute(0, 2, 3, 1)
    return np.ascontiguousarray(tensor.cpu().numpy())


def layer_outputs(model: nn.Module, spec: ArchSpec, images_nhwc: np.ndarray,
                  training: bool = False) -> dict[str, np.ndarray]:
    """Output of every canonical layer (conv before its BN, BN before its activation, dense), NHWC numpy."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            # clone now: an in-place ReLU right after this layer would overwrite the tensor
            captured[name] = output.detach().clone()
        return hook

    handles = [module.register_forward_hook(hook_for(name))
               for name, module in canonical_layers(model, spec).items()]
    try:
        with inference(model, training):
            model(_to_model_input(model, images_nhwc))
    finally:
        for handle in handles:
            handle.remove()
    return {layer.name: _to_nhwc_numpy(captured[layer.name]) for layer in spec.layers}

