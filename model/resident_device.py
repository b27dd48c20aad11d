"""Whole-volume multi-axes prediction on the Keras backend's device, end to end (model.resident, ``fuse_on=device``).

The input volume is copied to the device once; every plane is sliced, rotated (model.rotate's sampling tables),
predicted in batches, rotated back and added into the fused accumulator there; the votes (model.fusion's
functions on ``keras.ops``) run there too, and only the uint8 outputs come back, slab by slab. Nothing is copied
to the host between the models of an ensemble or between planes.

In-place updates of the large buffers are the one thing ``keras.ops`` lacks: :class:`DeviceBuffers` does them
per backend (JAX: a jitted ``dynamic_update_slice`` that donates the buffer, so XLA updates it in place;
TensorFlow: ``tf.Variable`` slice assignment). The torch backend is not supported here (``fuse_on=host``).
"""

from __future__ import annotations

import typing as tp

import numpy as np

from data.rotation import other_axes, rotated_volume_shape
from data.volume import NUM_CLASSES, VolumeRef, open_volume, read_checked
from model.fusion import fuse_totals
from model.planes import PLANES
from model.resident import FuseOnError, needs_ballots, rotated_again_later
from model.streaming import CHUNK, NoTimes, PhaseTimes, Progress

DEVICE_BACKENDS = ("jax", "tensorflow")


def _key(ndim: int, axis: int, start: int, size: int) -> tuple:
    return tuple(slice(start, start + size) if d == axis else slice(None) for d in range(ndim))


def _select(value, channels: tp.Optional[tuple[int, tp.Optional[int]]]):
    return value if channels is None else value[..., channels[0]:channels[1]]


class DeviceBuffers:
    """Large arrays on the device with slab reads and in-place slab updates along one axis.

    JAX: every read, update and accumulation is one jitted function with a traced start (a Python slice compiles
    once per start index in eager mode) and the buffer donated, so XLA updates it in place; the moves of the slab
    axis to the front and back happen inside. TensorFlow: ``tf.Variable`` slice assignment, eagerly."""

    def __init__(self) -> None:
        import keras

        self.backend = keras.backend.backend()
        if self.backend not in DEVICE_BACKENDS:
            raise FuseOnError(f"--fuse-on device: the {self.backend} backend is not supported (one of "
                              f"{DEVICE_BACKENDS}); use --fuse-on host")
        self.ops = keras.ops
        self._buffers: dict[str, tp.Any] = {}
        if self.backend == "jax":
            self._jax_functions()

    def _jax_functions(self) -> None:
        import functools

        import jax
        import jax.numpy as jnp
        from jax import lax

        def starts(ndim: int, axis: int, start) -> tuple:
            return tuple(start if d == axis else 0 for d in range(ndim))

        @functools.partial(jax.jit, static_argnames=("axis", "size", "front", "dtype"))
        def read(buf, start, *, axis: int, size: int, front: bool, dtype: tp.Optional[str]):
            x = lax.dynamic_slice(buf, starts(buf.ndim, axis, start),
                                  tuple(size if d == axis else n for d, n in enumerate(buf.shape)))
            x = x.astype(dtype) if dtype else x
            return jnp.moveaxis(x, axis, 0) if front else x

        def add_at(buf, value, start, axis: int):
            at = starts(buf.ndim, axis, start)
            return lax.dynamic_update_slice(buf, lax.dynamic_slice(buf, at, value.shape) + value.astype(buf.dtype), at)

        @functools.partial(jax.jit, static_argnames=("axis", "add", "front", "channels"), donate_argnums=(0,))
        def update(buf, value, start, *, axis: int, add: bool, front: bool, channels):
            value = _select(value, channels)
            value = jnp.moveaxis(value, 0, axis) if front else value
            if add:
                return add_at(buf, value, start, axis)
            return lax.dynamic_update_slice(buf, value.astype(buf.dtype), starts(buf.ndim, axis, start))

        @functools.partial(jax.jit, static_argnames=("axis", "k"), donate_argnums=(0,))
        def accumulate(state: dict, y, start, *, axis: int, k: int):
            probs = jnp.moveaxis(y[..., :k], 0, axis)
            out = {"sums": add_at(state["sums"], probs, start, axis)}
            if "counts" in state:  # the plane's ballot: its argmax, the first class on a tie (as numpy's)
                votes = (jnp.argmax(probs, axis=-1)[..., None] == jnp.arange(k)).astype(jnp.uint8)
                out["counts"] = add_at(state["counts"], votes, start, axis)
            if "fold" in state:
                out["fold"] = add_at(state["fold"], jnp.moveaxis(y[..., k], 0, axis), start, axis)
            return out

        self._jax = {"read": read, "update": update, "accumulate": accumulate}

    def compile(self, fn, static_argnames: tp.Sequence[str] = ()):
        """``fn`` (keras.ops on tensors) compiled once per input shape (model.forward.compile_for_backend)."""
        from model.forward import compile_for_backend

        return compile_for_backend(fn, static_argnames)

    def zeros(self, name: str, shape: tp.Sequence[int], dtype: str) -> None:
        shape = tuple(int(s) for s in shape)
        if self.backend == "jax":
            import jax.numpy as jnp

            self._buffers[name] = jnp.zeros(shape, dtype)
        else:
            import tensorflow as tf

            self._buffers[name] = tf.Variable(tf.zeros(shape, dtype), trainable=False)

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def read(self, name: str, axis: int, start: int, size: int, *, front: bool = False,
             dtype: tp.Optional[str] = None):
        """``size`` indices along ``axis`` from ``start`` (a copy on the device), cast to ``dtype``, the axis moved to
        the front with ``front``."""
        buf = self._buffers[name]
        if self.backend == "jax":
            import jax.numpy as jnp

            return self._jax["read"](buf, jnp.int32(start), axis=axis, size=int(size), front=front, dtype=dtype)
        x = buf[_key(len(buf.shape), axis, start, size)]
        x = self.ops.cast(x, dtype) if dtype else x
        return self.ops.moveaxis(x, axis, 0) if front else x

    def update(self, name: str, axis: int, start: int, value, *, add: bool, front: bool = False,
               channels: tp.Optional[tuple[int, tp.Optional[int]]] = None) -> None:
        """buffer[start:start + len along axis] = value (or += value with ``add``), in place; ``value`` with the axis
        in front when ``front``, of which the ``channels`` (start, stop) of its last axis."""
        buf = self._buffers[name]
        if self.backend == "jax":
            import jax.numpy as jnp

            self._buffers[name] = self._jax["update"](buf, value, jnp.int32(start), axis=axis, add=add, front=front,
                                                      channels=channels)
            return
        value = _select(value, channels)
        value = self.ops.moveaxis(value, 0, axis) if front else value
        key = _key(len(buf.shape), axis, start, int(value.shape[axis]))
        value = self.ops.cast(value, buf.dtype.name)
        buf[key].assign(buf[key] + value if add else value)

    def accumulate(self, axis: int, start: int, y, *, k: int) -> None:
        """Add a batch of uint8 probabilities ``y`` (slices first, K classes [+ the fold channel] last) into the
        buffers ``sums``, ``counts`` (the ballots, when kept) and ``fold`` (when kept), at ``start`` along ``axis``."""
        if self.backend == "jax":
            import jax.numpy as jnp

            names = [n for n in ("sums", "counts", "fold") if n in self._buffers]
            out = self._jax["accumulate"]({n: self._buffers[n] for n in names}, y, jnp.int32(start), axis=axis, k=k)
            self._buffers.update(out)
            return
        ops = self.ops
        self.update("sums", axis, start, y, add=True, front=True, channels=(0, k))
        if "counts" in self._buffers:
            votes = ops.one_hot(ops.argmax(y[..., :k], axis=-1), k, dtype="uint8")
            self.update("counts", axis, start, votes, add=True, front=True)
        if "fold" in self._buffers:
            self.update("fold", axis, start, y[..., k], add=True, front=True)

    def free(self, name: str) -> None:
        self._buffers.pop(name, None)


class DeviceAccumulator:
    """Σ P_i, the ballots and Σ fold disagreement on the device (model.resident.HostAccumulator's twin)."""

    def __init__(self, buffers: DeviceBuffers, shape: tp.Sequence[int], num_classes: int, *, ballots: bool,
                 fold: bool):
        self.buffers, self.ops = buffers, buffers.ops
        self.shape, self.num_classes = tuple(int(s) for s in shape), int(num_classes)
        self.ballots, self.fold = ballots, fold
        self.planes = 0
        buffers.zeros("sums", self.shape + (self.num_classes,), "uint16")
        if ballots:
            buffers.zeros("counts", self.shape + (self.num_classes,), "uint8")
        if fold:
            buffers.zeros("fold", self.shape, "uint16")

    @property
    def has_fold(self) -> bool:
        return self.fold

    def add(self, axis: int, start: int, y) -> None:
        """Add a batch of uint8 probabilities (slices first, classes last, the fold channel after them when kept) whose
        first axis lies along ``axis`` of the original grid from ``start``."""
        self.buffers.accumulate(axis, start, y, k=self.num_classes)

    def fused_blocks(self, vote: str, *, probabilities: bool, uncertainty: bool, slab: int = CHUNK
                     ) -> tp.Iterator[tuple[tuple, np.ndarray, tp.Optional[np.ndarray], dict]]:
        """(key, labels, P_avr float16 or None, maps) per slab along axis 0: voted on the device (one compiled
        function per slab shape), then copied."""
        ops, m = self.ops, self.planes

        def finalize(sums, counts, fold):
            return fuse_totals(sums, counts, fold, m, vote, probabilities=probabilities, uncertainty=uncertainty, ops=ops)

        compiled = self.buffers.compile(finalize)
        for z0 in range(0, self.shape[0], slab):
            size = min(slab, self.shape[0] - z0)
            lab, mean, maps = compiled(self.buffers.read("sums", 0, z0, size),
                                       self.buffers.read("counts", 0, z0, size) if self.ballots else None,
                                       self.buffers.read("fold", 0, z0, size) if self.fold else None)
            yield ((slice(z0, z0 + size), slice(0, self.shape[1])), ops.convert_to_numpy(lab),
                   None if mean is None else ops.convert_to_numpy(mean),
                   {k: ops.convert_to_numpy(v) for k, v in maps.items()})


def load_volume(buffers: DeviceBuffers, ref: VolumeRef, shape: tp.Sequence[int]) -> None:
    """The input volume into the device buffer ``volume`` (float32), slab by slab: no whole copy on the host."""
    buffers.zeros("volume", shape, "float32")
    with open_volume(ref) as vol:
        for z0 in range(0, int(shape[0]), CHUNK):
            block = np.asarray(read_checked(vol, np.s_[z0:z0 + CHUNK], ref=ref, field="image"), np.float32)
            buffers.update("volume", 0, z0, buffers.ops.convert_to_tensor(block), add=False)


def predict_on_device(ref: VolumeRef, shape: tp.Sequence[int], planes: tp.Sequence[str], models: tp.Sequence, *,
                      depth: int, vote: str, uncertainty: bool, fold_vote: str = "soft",
                      fold_disagreement: bool = False, num_classes: int = NUM_CLASSES, batch_size: int = 8,
                      times: tp.Optional[PhaseTimes] = None, progress: bool = True, rotation=None
                      ) -> DeviceAccumulator:
    """Every plane of ``planes`` predicted and fused on the device; returns the accumulator (outputs not yet copied).

    Phases as the file path names them: read (disk → device), rotate, predict, rotate_back; ``fuse`` (the votes)
    and ``write`` happen when the caller iterates :meth:`DeviceAccumulator.fused_blocks`."""
    from model.forward import make_forward
    from model.rotate import DeviceRotation, foreground_to_probabilities

    times = times or NoTimes()
    bars = Progress(progress)
    shape = tuple(int(s) for s in shape)
    k = int(num_classes)
    buffers = DeviceBuffers()
    ops = buffers.ops
    rotation = rotation if isinstance(rotation, DeviceRotation) else DeviceRotation()
    forward = make_forward(models, depth=depth, fold_vote=fold_vote, fold_disagreement=fold_disagreement,
                           batch_size=batch_size, quantized=True)
    with times.phase("read"):
        load_volume(buffers, ref, shape)
    acc = DeviceAccumulator(buffers, shape, k, ballots=needs_ballots(vote, uncertainty), fold=fold_disagreement)

    def sync(name: str) -> None:  # device work is asynchronous: wait for it where a phase ends (true phase times)
        x = buffers.read(name, 0, 0, 1)
        ops.convert_to_numpy(x[tuple(0 for _ in x.shape)])

    def rotate_step(planes, idx, w):  # (m, H, W) float32 → (m, h, w) float16, the file path's temporary dtype
        return ops.cast(rotation.rotate_tensor(planes, (idx, w)), "float16")

    def unrotate_step(block, idx, w, plane_h: int, plane_w: int):  # (m, h, w, C) f32 → (m, H, W, K [+1]) uint8
        # The plane shape is static: 1200 × 1000 and 1000 × 1200 planes rotate to the same square.
        back = rotation.unrotate_tensor(block, (plane_h, plane_w), (idx, w))
        probs = foreground_to_probabilities(back[..., :k - 1])
        if not fold_disagreement:
            return probs
        fold = ops.cast(ops.clip(ops.round(back[..., k - 1:]), 0, 255), "uint8")
        return ops.concatenate([probs, fold], axis=-1)

    rotate_compiled = buffers.compile(rotate_step)
    unrotate_compiled = buffers.compile(unrotate_step, static_argnames=("plane_h", "plane_w"))

    compiled_shapes: set = set()

    def predict_slices(source: str, axis: int, n: int, on_batch, desc: str, into: str) -> None:
        with bars.bar(n, desc) as bar:
            for j in range(0, n, batch_size):
                b = min(batch_size, n - j)
                x = buffers.read(source, axis, j, b, front=True, dtype="float32")
                shape_key = tuple(int(v) for v in x.shape[1:])
                # The first batch of a slice shape compiles the network (seconds per shape on a GPU): its own phase.
                with times.phase("predict" if shape_key in compiled_shapes else "compile"):
                    on_batch(axis, j, forward(x))
                    if shape_key not in compiled_shapes:
                        compiled_shapes.add(shape_key)
                        sync(into)
                bar.update(b)
            with times.phase("predict"):
                sync(into)

    rotated_about: tp.Optional[int] = None  # the axis the "rotated" buffer is rotated about
    for i, name in enumerate(planes):
        p = PLANES[name]
        if not p.rotated:
            predict_slices("volume", p.slice_axis, shape[p.slice_axis], acc.add, f"{name} predict", "sums")
            acc.planes += 1
            continue
        a = tp.cast(int, p.rotation_axis)
        b_ax, c_ax = other_axes(a)
        rshape = rotated_volume_shape(shape, a)
        plane_shape = (shape[b_ax], shape[c_ax])
        rot_pixels = rshape[b_ax] * rshape[c_ax]
        if rotated_about != a:  # the two planes of one rotation axis slice the same rotated volume: rotate it once
            buffers.free("rotated")
            # float16 as in the file path's temporary rotated volume: the same network input.
            buffers.zeros("rotated", rshape, "float16")
            idx, w = rotation.table("rotate", plane_shape)
            with bars.bar(shape[a], f"{name} rotate") as bar, times.phase("rotate"):
                step = rotation.planes_per_step(rot_pixels)
                for j in range(0, shape[a], step):
                    m = min(step, shape[a] - j)
                    rot = rotate_compiled(buffers.read("volume", a, j, m, front=True, dtype="float32"), idx, w)
                    buffers.update("rotated", a, j, rot, add=False, front=True)
                    bar.update(m)
                sync("rotated")
            rotated_about = a
        # Foreground classes only (background is the remainder after rotating back), and the fold channel.
        channels = k - 1 + (1 if fold_disagreement else 0)
        buffers.zeros("rotated_probabilities", rshape + (channels,), "uint8")
        predict_slices("rotated", p.slice_axis, rshape[p.slice_axis],
                       lambda axis, j, y: buffers.update("rotated_probabilities", axis, j, y, add=False, front=True,
                                                         channels=(1, None)),
                       f"{name} predict", "rotated_probabilities")
        if not rotated_again_later(planes, i):
            buffers.free("rotated")
            rotated_about = None
        idx, w = rotation.table("unrotate", plane_shape)
        with bars.bar(shape[a], f"{name} rotate back") as bar, times.phase("rotate_back"):
            step = rotation.planes_per_step(plane_shape[0] * plane_shape[1], channels)
            for j in range(0, shape[a], step):
                m = min(step, shape[a] - j)
                block = buffers.read("rotated_probabilities", a, j, m, front=True, dtype="float32")
                acc.add(a, j, unrotate_compiled(block, idx, w, plane_h=plane_shape[0], plane_w=plane_shape[1]))
                bar.update(m)
            sync("sums")
        buffers.free("rotated_probabilities")
        acc.planes += 1
    buffers.free("volume")
    return acc
