"""tf_impl.data against common.sampler's numpy references: byte-exact uint8, float32 within 1e-6."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from common.config import Recipe, RunSpec  # noqa: E402
from common.sampler import epoch_plan, normalize_reference, plan_batch_reference  # noqa: E402
from tf_impl.backend import Backend  # noqa: E402
from tf_impl.data import EvalPipeline, TrainPipeline  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyDataset:
    """The attributes of common.data.Dataset the backend uses (duck typing)."""

    def __init__(self, n_train=37, n_test=23, shape=(10, 12, 3), seed=0):
        rng = np.random.default_rng(seed)
        self.train_images = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
        self.train_labels = rng.integers(0, 10, n_train).astype(np.int64)
        self.test_images = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
        self.test_labels = rng.integers(0, 10, n_test).astype(np.int64)
        self.class_names = tuple(str(i) for i in range(10))
        self.fingerprint = "tiny"
        self.num_classes = 10
        self.in_shape = shape


def _pipeline(data, pad):
    return TrainPipeline(data.train_images, data.train_labels, "/CPU:0", crop_padding=pad, mean=MEAN, std=STD)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("pad", [4, 2])
def test_train_batches_equal_the_numpy_plan_byte_for_byte(drop_last, pad):
    data = TinyDataset()  # non-square images: a height/width mix-up would show
    pipeline = _pipeline(data, pad)
    plan = epoch_plan(seed=3, epoch=1, num_examples=37, batch_size=8, drop_last=drop_last, crop_padding=pad)
    assert plan.flips.any() and not plan.flips.all() and len(np.unique(plan.crop_offsets)) > 1
    raw = list(pipeline.batches(plan, raw=True))
    assert len(raw) == plan.num_batches == (4 if drop_last else 5)
    assert [len(y) for _, y in raw] == plan.batch_sizes()
    for index, ((images, labels), (start, stop)) in enumerate(zip(raw, plan.batch_bounds())):
        assert images.dtype == tf.uint8 and labels.dtype == tf.int64
        np.testing.assert_array_equal(images.numpy(), plan_batch_reference(data.train_images, plan, index))
        np.testing.assert_array_equal(labels.numpy(), data.train_labels[plan.order[start:stop]])
    for index, (images, labels) in enumerate(pipeline.batches(plan)):
        assert images.dtype == tf.float32 and images.shape[1:] == (10, 12, 3)
        want = normalize_reference(plan_batch_reference(data.train_images, plan, index), MEAN, STD)
        np.testing.assert_allclose(images.numpy(), want, rtol=0, atol=1e-6)


def test_no_augmentation_plan_is_the_identity_crop():
    data = TinyDataset()
    plan = epoch_plan(seed=0, epoch=0, num_examples=37, batch_size=37, augment=False)
    pipeline = TrainPipeline(data.train_images, data.train_labels, "/CPU:0", crop_padding=4, mean=MEAN, std=STD,
                             random_crop=False, horizontal_flip=False)
    (images, _), = list(pipeline.batches(plan, raw=True))
    np.testing.assert_array_equal(images.numpy(), data.train_images[plan.order])
    assert pipeline.augmentation() == "none"


def test_no_flip_pipeline_crops_like_the_reference_and_refuses_a_flipping_plan():
    data = TinyDataset()
    pipeline = TrainPipeline(data.train_images, data.train_labels, "/CPU:0", crop_padding=3, mean=MEAN, std=STD,
                             horizontal_flip=False)
    plan = epoch_plan(seed=3, epoch=1, num_examples=37, batch_size=8, crop_padding=3, horizontal_flip=False)
    assert not plan.flips.any() and len(np.unique(plan.crop_offsets)) > 1
    for index, (images, _) in enumerate(pipeline.batches(plan, raw=True)):
        np.testing.assert_array_equal(images.numpy(), plan_batch_reference(data.train_images, plan, index))
    assert pipeline.augmentation() == "random crop (pad 3)"
    with pytest.raises(ValueError, match="the pipeline was built for"):
        list(pipeline.batches(epoch_plan(seed=3, epoch=1, num_examples=37, batch_size=8, crop_padding=3)))


def test_pipeline_refuses_a_plan_it_was_not_built_for():
    data = TinyDataset()
    with pytest.raises(ValueError, match=r"\(2, True, True\); the pipeline was built for \(4, True, True\)"):
        list(_pipeline(data, 4).batches(epoch_plan(0, 0, 37, 8, crop_padding=2)))
    with pytest.raises(ValueError, match="covers 40"):
        list(_pipeline(data, 4).batches(epoch_plan(0, 0, 40, 8)))


def test_dataset_is_stored_once_padded_in_a_host_variable():
    """Captured by handle in every epoch's map function, not rebuilt as a per-epoch constant."""
    pipeline = _pipeline(TinyDataset(), 4)
    assert isinstance(pipeline.images, tf.Variable) and pipeline.images.dtype == tf.uint8
    assert pipeline.images.shape == (37, 18, 20, 3)  # padded once
    assert "CPU" in pipeline.images.device
    before = pipeline.images
    list(pipeline.batches(epoch_plan(0, 0, 37, 8)))
    list(pipeline.batches(epoch_plan(0, 1, 37, 8)))
    assert pipeline.images is before


def test_eval_batches_are_the_test_set_in_order_with_a_partial_last_batch():
    data = TinyDataset()
    pipeline = EvalPipeline(data.test_images, data.test_labels, "/CPU:0", batch_size=10, mean=MEAN, std=STD)
    raw = list(pipeline.batches(raw=True))
    assert [len(y) for _, y in raw] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in raw]), data.test_images)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in raw]), data.test_labels)
    normalised = np.concatenate([x.numpy() for x, _ in pipeline.batches()])
    np.testing.assert_allclose(normalised, normalize_reference(data.test_images, MEAN, STD), rtol=0, atol=1e-6)


def test_backend_attach_data_wires_the_recipe():
    data = TinyDataset(shape=(8, 8, 3))
    recipe = Recipe(batch_size=16, eval_batch_size=7, crop_padding=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    spec = RunSpec(model="seed_cnn", backend="tensorflow", device="cpu", recipe=recipe)
    backend = Backend()
    backend.attach_data(data, spec)
    plan = epoch_plan(1, 0, 37, 16, crop_padding=3)
    batches = list(backend.train_batches(plan))
    assert len(batches) == 2
    want = normalize_reference(plan_batch_reference(data.train_images, plan, 1), recipe.mean, recipe.std)
    np.testing.assert_allclose(batches[1][0].numpy(), want, rtol=0, atol=1e-6)
    assert [len(y) for _, y in backend.eval_batches()] == [7, 7, 7, 2]


def test_data_residency_counts_every_host_variable():
    """TensorFlow copies every array into a host tf.Variable: all of it is host data, none on the device."""
    data = TinyDataset(shape=(8, 8, 3))
    spec = RunSpec(model="seed_cnn", backend="tensorflow", device="cpu", recipe=Recipe(crop_padding=3))
    backend = Backend()
    backend.attach_data(data, spec)
    residency = backend.data_residency()
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    arrays = {"train_images": ["host", n_train * 14 * 14 * 3], "train_labels": ["host", n_train * 8],
              "test_images": ["host", n_test * 8 * 8 * 3], "test_labels": ["host", n_test * 8]}
    assert residency == {"train_data": "host", "host_bytes": sum(n for _, n in arrays.values()),
                         "device_bytes": 0, "arrays": arrays}


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="needs a machine without a GPU")
def test_an_unusable_on_device_prefetch_is_recorded_and_batches_still_arrive():
    """No silent fallback: when tf.data cannot copy to the GPU (here: there is none), the pipeline says so.

    The probe runs when the pipeline is built (before the audit), the note lands
    in the list the backend reports (manifest + audit), the placement names the
    fallback, and the batches are still the right ones.
    """
    data, notes = TinyDataset(), []
    pipeline = EvalPipeline(data.test_images, data.test_labels, "/GPU:0", batch_size=10, mean=MEAN, std=STD,
                            fallbacks=notes)
    assert len(notes) == 1 and "copy_to_device(/GPU:0) unusable" in notes[0]
    assert not pipeline.io.copy_in_pipeline and pipeline.io.placement.endswith("per step (fallback)")
    images, labels = next(iter(pipeline.batches(raw=True)))
    np.testing.assert_array_equal(images.numpy(), data.test_images[:10])
    cpu = EvalPipeline(data.test_images, data.test_labels, "/CPU:0", batch_size=10, mean=MEAN, std=STD,
                       fallbacks=notes)
    assert len(notes) == 1 and "fallback" not in cpu.io.placement  # the CPU path has nothing to fall back from


def test_thread_pools_tensorflow_cannot_change_are_a_fallback_note():
    backend = Backend()
    tf.constant(1.0) + 1.0  # the runtime is running: its thread pools are fixed from now on
    current = tf.config.threading.get_intra_op_parallelism_threads()
    settings = backend.setup(RunSpec(model="seed_cnn", backend="tensorflow", device="cpu", threads=current + 3))
    assert any("threads stay" in note for note in settings["fallbacks"]), settings["fallbacks"]
    assert settings["intra_op_threads"] == current  # read back: what really runs
