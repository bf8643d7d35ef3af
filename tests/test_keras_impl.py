"""keras_impl, the Keras code both Keras backends share, exercised here on TensorFlow (in this process).

The keras-torch side of the same code is checked in its own process (tests/test_kerastorch.py).
"""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from common.architectures import ARCHITECTURES, arch_spec  # noqa: E402
from common.init import initial_weights  # noqa: E402
from common.registry import get_backend  # noqa: E402
from keras_impl.layers import NAME_SEPARATOR, composed_batch_norm, keras_layer_name  # noqa: E402
from tests import fit_checks  # noqa: E402
from tf_impl import weights as tf_weights  # noqa: E402
from tf_impl.layers import _fused_batch_norm  # noqa: E402
from tf_impl.models import create_model  # noqa: E402

FIT_RTOL = 1e-5  # same float32 computation both ways (tests/test_kerastorch.py uses the same bound)


def test_keras_layer_names_map_one_to_one_and_avoid_torch_forbidden_dots():
    """Keras's torch backend registers variables under their path and torch refuses '.': every Keras layer
    name is the canonical one with '_' for '.', which is one-to-one only while no canonical name holds '_'."""
    for model in ARCHITECTURES:
        names = [layer.name for layer in arch_spec(model).layers]
        assert not any(NAME_SEPARATOR in name for name in names), model
        assert len({keras_layer_name(n) for n in names}) == len(names)
        built = create_model(model, 10, (32, 32, 3))
        assert not any("." in v.path for v in built.weights), model
    assert keras_layer_name("a_b.c") == keras_layer_name("a.b_c")  # why no canonical name may hold '_'


def test_fused_tensorflow_kernel_matches_the_composed_keras_ops_one():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((16, 6, 6, 8)).astype(np.float32) * 2 + 0.5)
    gamma, beta = (tf.constant(rng.uniform(0.5, 1.5, 8).astype(np.float32)) for _ in range(2))
    for fused, composed in zip(_fused_batch_norm(x, gamma, beta, 1e-5), composed_batch_norm(x, gamma, beta, 1e-5)):
        np.testing.assert_allclose(fused.numpy(), composed.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_fit_and_the_custom_step_reach_the_same_parameters_on_tensorflow(mode):
    """K steps of model.fit and of the custom step, same start and batches: every weight, BN statistic and
    slot agrees to float32 rounding; a fit whose LR is not set per step from the schedule does not."""
    backend = get_backend("tensorflow")
    same = fit_checks.fit_and_custom(backend, mode=mode)
    worst, where = fit_checks.worst_relative_difference(same["fit"], same["custom"])
    assert int(same["fit"]["o/step"]) == int(same["custom"]["o/step"]) == fit_checks.STEPS
    assert worst <= FIT_RTOL, (worst, where)
    if mode == "graph":
        wrong = fit_checks.fit_and_custom(backend, mode=mode, wrong_lrs=True)
        assert fit_checks.worst_relative_difference(wrong["fit"], wrong["custom"])[0] > 100 * FIT_RTOL


def test_a_saved_keras_file_loads_back_with_the_shared_layers(tmp_path):
    """.keras saving keeps working for the shared custom layers (registered serializable)."""
    model = create_model("resnet20", 10, (16, 16, 3))
    tf_weights.set_weights(model, model.arch_spec, initial_weights(model.arch_spec, "torch_default", 0))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
