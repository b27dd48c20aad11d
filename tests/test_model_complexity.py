"""Analytic complexity (model.complexity) against Keras, TensorFlow's profiler and gradients, and
the ``python -m model.summary`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import complexity
from model.complexity import (
    count_flops,
    count_params,
    jump_recursion_receptive_field,
    paper_receptive_field,
    receptive_field,
    receptive_field_interval,
)
from model.summary import main as summary_main

REPO = Path(__file__).resolve().parents[1]
PAPER_GRID = [(w, d) for w in (32, 64, 96, 112) for d in (3, 4, 5, 6)]


# ---------------------------------------------------------------------------------- parameters
def test_paper_size_model_has_279873796_params():
    # "The models with c0 = 96 and d = 5 have about 280 million parameters" (Model section)
    assert count_params(96, 5) == 279_873_796


@pytest.mark.parametrize("width,depth", PAPER_GRID)
def test_paper_grid_param_counts_closed_form(width, depth):
    """Closed form, independent of the layer list: per level l with c = c0 2^l, encoder block
    9(cin c + c^2) + 2c (bias) + 8c (BN); bottleneck likewise; decoder level: transposed conv
    4 (2c) c + c, block 9(2c c + c^2) + 10c; 1x1 conv 4 c0 + 4."""
    total, cin = 0, 1
    for level in range(depth + 1):
        c = width * 2**level
        total += 9 * (cin * c + c * c) + 10 * c
        cin = c
    for level in range(depth):
        c = width * 2**level
        total += 4 * 2 * c * c + c + 9 * (2 * c * c + c * c) + 10 * c
    total += 4 * width + 4
    assert count_params(width, depth) == total
    # width scales parameters ~quadratically, depth ~4x per level
    assert count_params(width, depth) < count_params(width, depth + 1)


def test_params_grow_with_classes_and_channels():
    assert count_params(32, 3, 5) - count_params(32, 3, 4) == 32 + 1
    assert count_params(32, 3, in_channels=3) - count_params(32, 3) == 2 * 9 * 32


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: count_params(0, 3), "width"),
        (lambda: count_params(32, 0), "depth"),
        (lambda: count_params(32, 3, 0), "num_classes"),
        (lambda: count_flops(32, 3, 100), "input_size"),
        (lambda: count_flops(-1, 3, 384), "width"),
        (lambda: receptive_field(0), "depth"),
        (lambda: paper_receptive_field(-2), "depth"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(field)


# ---------------------------------------------------------------------------------- FLOPs
def test_baseline_flops():
    # platform facts: c0=32, d=3, 384^2 = 41.3 GFLOPs per image forward
    assert count_flops(32, 3, 384) == 41_344_303_104
    assert count_flops(32, 3, (384, 384)) == count_flops(32, 3, 384)


def test_flops_scale_with_pixels_and_are_consistent_with_layers():
    assert count_flops(64, 5, 640) * 384 * 384 == count_flops(64, 5, 384) * 640 * 640
    assert count_flops(16, 4, (64, 128)) == 2 * count_flops(16, 4, 64)
    layers = complexity.conv_layers(8, 2, 32)
    assert [layer.kind for layer in layers].count("transpose") == 2
    assert sum(2 * layer.macs for layer in layers) == count_flops(8, 2, 32)


def _profile(width, depth, size):
    """Conv2D + Conv2DBackpropInput flops and the total of TF's profiler on the frozen graph."""
    tf = pytest.importorskip("tensorflow")
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from model.unet import build_unet

    model = build_unet(width, depth)
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, size, size, 1], tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    root = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts)
    by_type, stack = {}, list(root.children)  # the "op" view nests op types as a chain
    while stack:
        node = stack.pop()
        by_type[node.name] = by_type.get(node.name, 0) + node.float_ops
        stack.extend(node.children)
    return by_type, root.total_float_ops


@pytest.mark.parametrize("width,depth,size", [(4, 1, 32), (8, 2, 64), (4, 3, 48), (16, 2, 32), (32, 3, 64)])
def test_flops_equal_tf_profiler_conv_flops(width, depth, size):
    by_type, total = _profile(width, depth, size)
    conv = by_type.get("Conv2D", 0) + by_type.get("Conv2DBackpropInput", 0)
    assert by_type.get("Conv2DBackpropInput", 0) > 0
    assert conv == count_flops(width, depth, size)
    assert total > conv  # BN, bias, Mish, pool are counted on top
    if width >= 32:  # for realistic widths the non-conv part is small (tiny widths: ~5 %)
        assert total == pytest.approx(count_flops(width, depth, size), rel=0.01)


# ---------------------------------------------------------------------------------- receptive field
def test_receptive_field_values():
    assert [receptive_field(d) for d in (3, 4, 5, 6)] == [100, 204, 412, 828]
    assert [receptive_field(d) for d in (1, 2)] == [18, 44]
    assert all(receptive_field(d) == 13 * 2**d - 4 for d in range(3, 9))


def test_paper_receptive_field_is_the_stride_ignoring_recursion():
    assert [paper_receptive_field(d) for d in (3, 4, 5, 6)] == [188, 460, 1084, 2492]
    for d in range(1, 9):
        assert jump_recursion_receptive_field(d, ignore_upsampling_stride=True) == paper_receptive_field(d)
        # with the stride, the textbook recursion is 4 px short of the exact value for d >= 3
        assert jump_recursion_receptive_field(d, ignore_upsampling_stride=False) == 13 * 2**d - 8
        assert receptive_field(d) <= paper_receptive_field(d)


def test_receptive_field_interval_is_periodic_in_position():
    for d in (1, 3, 5):
        m = 2**d
        for x in range(m):
            lo, hi = receptive_field_interval(d, x)
            lo2, hi2 = receptive_field_interval(d, x + 3 * m)
            assert (lo2 - lo, hi2 - hi) == (3 * m, 3 * m)
            assert lo <= x <= hi


def _empirical_intervals(depth, width=2, reps=2):
    """Input extent (rows and cols) of the nonzero gradient of output pixel (c+p, c+p), for each
    phase p in 0..2^d-1. Random inputs and He-initialised weights; the union over ``reps`` random
    inputs (and over channels/rows) makes every max-pool window route gradient to its extreme
    pixels somewhere, so the union is the full receptive field."""
    tf = pytest.importorskip("tensorflow")
    import keras

    from model.unet import build_unet

    m = 2**depth
    size = -(-(receptive_field(depth) + 3 * m) // m) * m + 2 * m  # RF fits, no border effects
    keras.utils.set_random_seed(depth)
    model = build_unet(width, depth, input_shape=(size, size, 1))
    c = size // 2
    n = m * reps
    x = tf.constant(np.random.default_rng(depth).normal(size=(n, size, size, 1)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
        # sample i looks at phase i % m; samples are independent in inference mode
        target = tf.add_n([y[i, c + i % m, c + i % m, 0] for i in range(n)])
    nonzero = np.abs(tape.gradient(target, x).numpy()[..., 0]) != 0
    result = {}
    for p in range(m):
        mask = nonzero[p::m].any(axis=0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert rows[0] > 0 and cols[0] > 0 and rows[-1] < size - 1 and cols[-1] < size - 1
        result[c + p] = ((rows[0], rows[-1]), (cols[0], cols[-1]))
    return result


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_receptive_field_matches_gradients(depth):
    emp = _empirical_intervals(depth)
    for pos, (rows, cols) in emp.items():
        assert rows == cols == receptive_field_interval(depth, pos), pos
    assert max(hi - lo + 1 for (lo, hi), _ in emp.values()) == receptive_field(depth)


# ---------------------------------------------------------------------------------- CLI
def _run_cli(capsys, *argv):
    rc = summary_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_single(capsys):
    rc, out, err = _run_cli(capsys, "--width", "32", "--depth", "3", "--input-size", "384", "--json")
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    for key in ("width", "depth", "input_size", "params", "flops", "gflops", "receptive_field",
                "paper_receptive_field", "input_size_ok"):
        assert key in row
    assert (row["width"], row["depth"], row["input_size"]) == (32, 3, 384)
    assert row["params"] == 1_930_756 and row["flops"] == 41_344_303_104
    assert row["gflops"] == pytest.approx(41.344, abs=1e-3)
    assert (row["receptive_field"], row["paper_receptive_field"], row["input_size_ok"]) == (100, 188, True)


def test_cli_all(capsys):
    rc, out, _ = _run_cli(capsys, "--all", "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert rc == 0 and len(rows) == 48
    assert {(r["width"], r["depth"], r["input_size"]) for r in rows} == {
        (w, d, s) for w in (32, 64, 96, 112) for d in (3, 4, 5, 6) for s in (384, 512, 640)
    }
    big = next(r for r in rows if (r["width"], r["depth"], r["input_size"]) == (96, 5, 384))
    assert big["params"] == 279_873_796
    rc, out, _ = _run_cli(capsys, "--all")
    assert rc == 0
    assert sum(1 for line in out.splitlines() if line.split() and line.split()[0].isdigit()) == 48
    assert "279,873,796" in out


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--width", "32", "--depth", "5", "--input-size", "400"], "input_size"),
        (["--width", "0", "--depth", "3", "--input-size", "384"], "width"),
        (["--width", "32", "--depth", "0", "--input-size", "384"], "depth"),
        (["--width", "abc", "--depth", "3", "--input-size", "384"], "--width"),
        (["--depth", "3", "--input-size", "384"], "--width"),
        (["--all", "--width", "32"], "--width"),
    ],
)
def test_cli_bad_input_exits_2(capsys, argv, field):
    rc, out, err = _run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0]


def test_cli_module_entry_point():
    ok = subprocess.run([sys.executable, "-m", "model.summary", "--width", "64", "--depth", "5",
                         "--input-size", "640", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["params"] == count_params(64, 5)
    bad = subprocess.run([sys.executable, "-m", "model.summary", "--width", "64", "--depth", "5",
                          "--input-size", "500"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "input_size 500 is not divisible by 2^depth=32" in bad.stderr


def test_summary_does_not_import_keras():
    code = "import sys, model.summary, model.complexity, model; print('keras' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "False", res.stderr


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_memory_estimate_counts_weights_and_adam_state_as_keras_allocates_them(precision):
    import keras

    from model.complexity import training_memory, trainable_params
    from model.unet import build_unet

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_unet(6, 3)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.optimizer.build(model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    def nbytes(variables):
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    est = training_memory(6, 3, 64, 2, precision)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == trainable_params(6, 3)
    cast_copies = 0 if precision == "float32" else 2 * trainable_params(6, 3)
    assert est.weights - cast_copies == nbytes(model.weights)  # every variable float32, BN statistics included
    assert est.gradients == nbytes(model.trainable_variables)
    slots = [v for v in model.optimizer.variables if len(v.shape) > 0]  # Adam m and v; scalars are negligible
    assert est.optimizer == nbytes(slots)
    # Activations grow with the batch and the image area; the state does not.
    two = training_memory(6, 3, 128, 4, precision)
    assert two.state == est.state and two.activations == pytest.approx(8 * est.activations, rel=1e-9)
    if precision != "float32":  # half-precision activations (the float32 logits stay)
        assert 1.8 * est.activations < training_memory(6, 3, 64, 2, "float32").activations < 2 * est.activations


def test_memory_estimate_of_the_largest_paper_configs():
    from model.complexity import training_memory

    # Weights, gradients and Adam alone: 16 B per parameter, ~24 GB at c0=112, d=6 (1.52 G parameters).
    big = training_memory(112, 6, 640, 4, "mixed_float16")
    assert 24e9 < big.gradients + big.optimizer + big.weights - 2 * (big.gradients // 4) < 24.5e9
    assert big.total > 32e9 > training_memory(32, 3, 384, 8, "mixed_float16").total
    with pytest.raises(ValueError, match="precision"):
        training_memory(32, 3, 384, 8, "float8")
