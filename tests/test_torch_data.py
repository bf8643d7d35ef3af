"""torch_impl.data pipelines against the numpy references of common.sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import Recipe
from common.loop import plan_for
from common.sampler import epoch_plan, normalize_reference, plan_batch_reference
from tests.torch_helpers import cpu_spec, tiny_dataset
from torch_impl.backend import Backend


def _attached(dataset, channels_last=False, **recipe):
    spec = cpu_spec(channels_last=channels_last, recipe=Recipe(**{"batch_size": 8, "eval_batch_size": 5, **recipe}))
    backend = Backend()
    backend.setup(spec)
    backend.attach_data(dataset, spec)
    return backend, spec


def _plan(spec, dataset, epoch=0):
    return plan_for(spec, epoch, len(dataset.train_labels))


@pytest.mark.parametrize("recipe", [{}, {"drop_last": False}, {"augment": False}, {"crop_padding": 2},
                                    {"crop_padding": 0, "drop_last": False}, {"horizontal_flip": False}])
def test_raw_train_batches_equal_the_numpy_reference_byte_for_byte(recipe):
    dataset = tiny_dataset(n_train=43)
    backend, spec = _attached(dataset, **recipe)
    for epoch in (0, 1):
        plan = _plan(spec, dataset, epoch)
        batches = list(backend.train_batches(plan, raw=True))
        assert len(batches) == plan.num_batches
        for index, (images, labels) in enumerate(batches):
            start, stop = plan.batch_bounds()[index]
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64
            np.testing.assert_array_equal(backend.to_numpy(images), plan_batch_reference(dataset.train_images, plan, index))
            np.testing.assert_array_equal(backend.to_numpy(labels), dataset.train_labels[plan.order[start:stop]])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_normalised_train_batches_are_nchw_float32_within_1e_6(channels_last, shape):
    mean, std = (0.5,) * shape[2], (0.25,) * shape[2]
    dataset = tiny_dataset(n_train=24, shape=shape)
    backend, spec = _attached(dataset, channels_last=channels_last, mean=mean, std=std)
    plan = _plan(spec, dataset)
    for index, (images, labels) in enumerate(backend.train_batches(plan)):
        assert images.dtype == torch.float32 and images.shape == (8, shape[2], shape[0], shape[1])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=memory_format)
        expected = normalize_reference(plan_batch_reference(dataset.train_images, plan, index), mean, std)
        np.testing.assert_allclose(backend.to_numpy(images).transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-6)


def test_cifar_normalisation_within_1e_6_on_every_byte_value():
    from common.data import Dataset

    images = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 32, 32, 3)).copy()
    train = tiny_dataset(n_train=16)
    dataset = Dataset(spec="test", train_images=train.train_images, train_labels=train.train_labels,
                      test_images=images, test_labels=np.zeros(256, np.int64), class_names=train.class_names,
                      fingerprint="x", from_cache=False)
    backend, spec = _attached(dataset, eval_batch_size=256)
    (batch, _), = list(backend.eval_batches())
    expected = normalize_reference(images, spec.recipe.mean, spec.recipe.std)
    np.testing.assert_allclose(backend.to_numpy(batch).transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-6)


def test_eval_batches_cover_the_test_set_in_order_with_a_partial_last_batch():
    dataset = tiny_dataset(n_test=13)
    backend, spec = _attached(dataset)
    raw = list(backend.eval_batches(raw=True))
    assert [len(labels) for _, labels in raw] == [5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([backend.to_numpy(i) for i, _ in raw]), dataset.test_images)
    np.testing.assert_array_equal(np.concatenate([backend.to_numpy(l) for _, l in raw]), dataset.test_labels)
    normalised = np.concatenate([backend.to_numpy(i) for i, _ in backend.eval_batches()])
    expected = normalize_reference(dataset.test_images, spec.recipe.mean, spec.recipe.std)
    np.testing.assert_allclose(normalised.transpose(0, 2, 3, 1), expected, rtol=0, atol=1e-6)


def test_plan_for_another_dataset_or_padding_is_rejected():
    dataset = tiny_dataset(n_train=24)
    backend, spec = _attached(dataset)
    with pytest.raises(ValueError):
        list(backend.train_batches(epoch_plan(0, 0, 16, 8)))
    with pytest.raises(ValueError):
        list(backend.train_batches(epoch_plan(0, 0, 24, 8, crop_padding=2)))


def test_batches_need_attached_data():
    with pytest.raises(RuntimeError):
        Backend().eval_batches()


def test_data_residency_counts_the_copies_the_pipelines_hold_and_where():
    """CPU: the padded training images are torch's own copy (host); views of common.data's arrays count 0."""
    dataset = tiny_dataset(n_train=40, n_test=13)
    backend, spec = _attached(dataset, crop_padding=4)
    residency = backend.data_residency()
    padded = 40 * (32 + 8) * (32 + 8) * 3  # uint8
    assert residency["train_data"] == "host"
    assert residency["arrays"] == {"train_images": ["host", padded], "train_labels": ["host", 0],
                                   "test_images": ["host", 0], "test_labels": ["host", 0]}
    assert (residency["host_bytes"], residency["device_bytes"]) == (padded, 0)
    # a label array of another dtype is converted, i.e. copied: then it counts
    dataset = tiny_dataset(n_train=40)
    object.__setattr__(dataset, "train_labels", dataset.train_labels.astype(np.int32))
    backend, _ = _attached(dataset)
    assert backend.data_residency()["arrays"]["train_labels"] == ["host", 40 * 8]
    with pytest.raises(RuntimeError):
        Backend().data_residency()


@pytest.mark.parametrize("recipe, applied", [({}, "random crop (pad 4) + horizontal flip"),
                                             ({"horizontal_flip": False, "crop_padding": 3}, "random crop (pad 3)"),
                                             ({"augment": False}, "none")])
def test_pipeline_reports_what_it_applies_and_refuses_another_plan(recipe, applied):
    dataset = tiny_dataset(n_train=16)
    backend, spec = _attached(dataset, mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125), **recipe)
    settings = backend.audit(*_model_and_step(backend, spec))
    assert settings["augmentation"] == applied
    assert settings["input_normalization"] == "mean (0.25, 0.5, 0.75) std (0.5, 0.25, 0.125)"
    plan = _plan(spec, dataset)
    other = epoch_plan(0, 0, 16, 8, augment=not plan.random_crop, crop_padding=plan.crop_padding)
    with pytest.raises(ValueError, match="the pipeline was built for"):
        list(backend.train_batches(other))


def _model_and_step(backend, spec):
    model = backend.build_model(spec.model, 10, (32, 32, 3))
    return model, backend.make_train_step(model, spec)
