"""The Keras U-net (model.unet): structure, parameter counts, shapes, padding and full-slice inference.

Only small models are built (<= ~8 M parameters); the paper-size counts are checked analytically
in test_model_complexity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from model.complexity import conv_layers, count_params  # noqa: E402
from model.unet import (  # noqa: E402
    build_unet,
    check_input_size,
    crop_padding,
    infer_depth,
    pad_to_multiple,
    predict_full_slice,
)

# (width, depth) pairs that are cheap to build: widths 4/8/16 x depths 1..6 plus the paper's
# c0=32 at d=3, 4; width 16 at d=6 (31 M parameters) is left out.
SMALL_CONFIGS = [(w, d) for w in (4, 8, 16) for d in range(1, 7) if count_params(w, d) <= 8_000_000]
SMALL_CONFIGS += [(32, 3), (32, 4)]


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_small_configs_cover_all_depths():
    assert {d for _, d in SMALL_CONFIGS} == set(range(1, 7))
    assert len(SMALL_CONFIGS) == 19


@pytest.mark.parametrize("width,depth", SMALL_CONFIGS)
def test_param_count_and_output_shape(width, depth):
    model = build_unet(width, depth)
    assert model.count_params() == count_params(width, depth)
    assert model.name == f"unet_c{width}_d{depth}"
    size = 2**depth  # smallest input that passes (bottleneck 1x1)
    h, w = 2 * size, size
    y = model(np.zeros((2, h, w, 1), np.float32), training=False)
    assert tuple(y.shape) == (2, h, w, 4)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"


def test_layers_match_complexity_layer_list():
    """Per-layer: every conv of conv_layers() exists with the same kernel and parameter count."""
    model = build_unet(8, 3, num_classes=3)
    names = {layer.name for layer in model.layers}
    for spec in conv_layers(8, 3, num_classes=3):
        layer = model.get_layer(spec.name)
        params = layer.count_params()
        if spec.batch_norm:
            params += model.get_layer(spec.name.replace("conv", "bn")).count_params()
        assert params == spec.params, spec.name
        assert tuple(layer.kernel.shape[:2]) == (spec.kernel, spec.kernel)
        assert tuple(layer.strides) == (spec.stride, spec.stride)
        assert layer.padding == "same"
    # structure: d pools, BN after each 3x3 conv, Mish everywhere, no softmax at the end
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 3
    convs3 = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
              and not isinstance(layer, keras.layers.Conv2DTranspose) and layer.kernel_size == (3, 3)]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(convs3) == len(bns) == 2 * (2 * 3 + 1)
    assert model.layers[-1].name == "logits" and model.layers[-1].activation.__name__ == "linear"
    assert "dec0_concat" in names and "bottleneck_conv2" in names
    assert model.get_layer("bottleneck_conv2").filters == 8 * 2**3


def test_dtype_policy_mixed_float16_gives_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_unet(4, 2)
    assert model.get_layer("enc0_conv1").compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    y = model(np.zeros((1, 8, 8, 1), np.float32), training=False)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"


def test_fixed_input_shape_and_multichannel():
    model = build_unet(4, 2, input_shape=(16, 24, 2), num_classes=5, name="m")
    assert model.name == "m"
    assert tuple(model.output_shape) == (None, 16, 24, 5)
    assert model.count_params() == count_params(4, 2, 5, in_channels=2)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(width=0, depth=3), "width"),
        (dict(width=-8, depth=3), "width"),
        (dict(width=8, depth=0), "depth"),
        (dict(width=8.5, depth=3), "width"),
        (dict(width=8, depth=True), "depth"),
        (dict(width=8, depth=3, num_classes=0), "num_classes"),
        (dict(width=8, depth=3, input_shape=(100, 96, 1)), "input_shape height"),
        (dict(width=8, depth=3, input_shape=(96, 100, 1)), "input_shape width"),
        (dict(width=8, depth=3, input_shape=(96, 96)), "input_shape"),
        (dict(width=8, depth=3, input_shape=(96, 96, 0)), "input_shape channels"),
    ],
)
def test_build_unet_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError) as err:
        build_unet(**kwargs)
    assert str(err.value).startswith(field)


def test_check_input_size():
    assert check_input_size(384, 3) == (384, 384)
    assert check_input_size((64, 128), 6) == (64, 128)
    for size in (384, 512, 640):
        for depth in (3, 4, 5, 6):
            check_input_size(size, depth)
    with pytest.raises(ValueError, match=r"^input_size 500 is not divisible by 2\^depth=16 "):
        check_input_size(500, 4)
    with pytest.raises(ValueError, match=r"^input_size 100 \(of \(64, 100\)\) is not divisible"):
        check_input_size((64, 100), 3)
    with pytest.raises(ValueError, match="^input_size must be a positive"):
        check_input_size(0, 3)
    with pytest.raises(ValueError, match="^depth"):
        check_input_size(64, 0)


@pytest.mark.parametrize("shape", [(37, 53), (3, 37, 53), (2, 37, 53, 1), (1, 5), (64, 64)])
@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_to_multiple_and_crop_numpy(shape, mode):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    padded, pads = pad_to_multiple(x, 3, mode=mode)
    axes = (0, 1) if x.ndim == 2 else (1, 2)
    for ax, (before, after) in zip(axes, pads):
        assert padded.shape[ax] % 8 == 0
        assert padded.shape[ax] - x.shape[ax] == before + after < 8
        assert 0 <= after - before <= 1
    np.testing.assert_array_equal(crop_padding(padded, pads, axes), x)
    if mode == "constant" and pads[0][0]:
        assert not padded.take(0, axis=axes[0]).any()


def test_pad_to_multiple_tensor_matches_numpy():
    x = np.arange(2 * 10 * 13, dtype=np.float32).reshape(2, 10, 13, 1)
    ref, pads = pad_to_multiple(x, 2, mode="reflect")
    got, pads_t = pad_to_multiple(keras.ops.convert_to_tensor(x), 2, mode="reflect")
    assert pads == pads_t == ((1, 1), (1, 2))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), ref)


def test_predict_full_slice_returns_input_size():
    keras.utils.set_random_seed(1)
    model = build_unet(4, 3)
    assert infer_depth(model) == 3
    rng = np.random.default_rng(1)
    one = rng.normal(size=(45, 61)).astype(np.float32)
    y = predict_full_slice(model, one, 3)
    assert y.shape == (45, 61, 4) and y.dtype == np.float32
    # batches, batch_size splitting, probabilities, depth inferred
    batch = rng.normal(size=(3, 45, 61)).astype(np.float32)
    yb = predict_full_slice(model, batch, batch_size=2)
    assert yb.shape == (3, 45, 61, 4)
    np.testing.assert_allclose(yb[0], predict_full_slice(model, batch[:1, ..., None])[0], rtol=1e-4, atol=1e-4)
    p = predict_full_slice(model, batch, probabilities=True, mode="constant")
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    # a divisible slice is not padded: identical to calling the model directly
    even = rng.normal(size=(1, 48, 64, 1)).astype(np.float32)
    direct = keras.ops.convert_to_numpy(model(even, training=False))
    np.testing.assert_allclose(predict_full_slice(model, even), direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slice2d_or_batch"):
        predict_full_slice(model, np.zeros((1, 1, 8, 8, 1), np.float32))


def test_a_model_trained_with_synchronized_batch_norm_exports_a_file_every_backend_loads(tmp_path):
    """JAX and torch refuse BatchNormalization(synchronized=True) (issue 29, item 5): the export drops the flag."""
    import json
    import zipfile

    import keras

    from model.training import export_model
    from model.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(4, 2, synchronized_bn=True)
    assert any(getattr(layer, "synchronized", False) for layer in model.layers)
    export_model(model, tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras") as z:
        config = z.read("config.json").decode()
    assert '"synchronized": true' not in config and '"synchronized": false' in config
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    x = np.random.default_rng(0).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6)
    assert json.loads(config)["config"]["name"] == model.name
