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
from model.fusion import (FOLD_DISAGREEMENT, fold_disagreement_from_sum, majority_vote_from_counts, mean_from_sums,
                          soft_vote_from_sums, uncertainty_from_totals)
from model.planes import PLANES
from model.resident import FuseOnError, needs_ballots
from model.streaming import CHUNK, NoTimes, PhaseTimes, Progress

DEVICE_BACKENDS = ("jax", "tensorflow")


def _key(ndim: int, axis: int, start: int, size: int) -> tuple:
    return tuple(slice(start, start + size) if d == axis else slice(None) for d in range(ndim))


class DeviceBuffers:
    """Large arrays on the device with in-place slab updates along one axis."""

    def __init__(self) -> None:
        import keras

        self.backend = keras.backend.backend()
        if self.backend not in DEVICE_BACKENDS:
            raise FuseOnError(f"--fuse-on device: the {self.backend} backend is not supported (one of "
                              f"{DEVICE_BACKENDS}); use --fuse-on host")
        self.ops = keras.ops
        self._buffers: dict[str, tp.Any] = {}
        if self.backend == "jax":
            import functools

            import jax
            from jax import lax

            @functools.partial(jax.jit, static_argnames=("axis", "add"), donate_argnums=(0,))
            def update(buf, value, start, *, axis: int, add: bool):
                starts = tuple(start if d == axis else 0 for d in range(buf.ndim))
                value = value.astype(buf.dtype)
                if add:
                    value = lax.dynamic_slice(buf, starts, value.shape) + value
                return lax.dynamic_update_slice(buf, value, starts)

            self._jax_update = update

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

    def get(self, name: str):
        """The buffer's current value (a tensor; read it before the next update)."""
        buf = self._buffers[name]
        return buf if self.backend == "jax" else buf.read_value()

    def slab(self, name: str, axis: int, start: int, size: int):
        """``size`` indices along ``axis`` from ``start`` (a copy on the device)."""
        buf = self._buffers[name]
        return buf[_key(len(buf.shape), axis, start, size)]

    def update(self, name: str, axis: int, start: int, value, *, add: bool) -> None:
        """buffer[start:start + len along axis] = value (or += value with ``add``), in place."""
        buf = self._buffers[name]
        if self.backend == "jax":
            import jax.numpy as jnp

            self._buffers[name] = self._jax_update(buf, value, jnp.int32(start), axis=axis, add=add)
            return
        key = _key(len(buf.shape), axis, start, int(value.shape[axis]))
        value = self.ops.cast(value, buf.dtype.name)
        buf[key].assign(buf[key] + value if add else value)

    def free(self, name: str) -> None:
        self._buffers.pop(name, None)


class DeviceAccumulator:
    """Σ P_i, the ballots and Σ fold disagreement on the device (model.resident.HostAccumulator's twin)."""

    def __init__(self, buffers: DeviceBuffers, shape: tp.Sequence[int], num_classes: int, *, ballots: bool,
                 fold: bool):
        self.buffers, self.ops = buffers, buffers.ops
        self.shape, self.num_classes = tuple(int(s) for s in shape), int(num_classes)
        self.ballots, self.fold = ballots, fold
        self.has_fold = fold
        self.planes = 0
        buffers.zeros("sums", self.shape + (self.num_classes,), "uint16")
        if ballots:
            buffers.zeros("counts", self.shape + (self.num_classes,), "uint8")
        if fold:
            buffers.zeros("fold", self.shape, "uint16")

    def add(self, axis: int, start: int, probs, fold=None) -> None:
        """Add uint8 probabilities (a slab along ``axis``, original grid, classes last) and their fold channel."""
        ops = self.ops
        self.buffers.update("sums", axis, start, probs, add=True)
        if self.ballots:
            self.buffers.update("counts", axis, start, ops.one_hot(ops.argmax(probs, axis=-1), self.num_classes,
                                                                   dtype="uint8"), add=True)
        if self.fold and fold is not None:
            self.buffers.update("fold", axis, start, fold, add=True)

    def fused_blocks(self, vote: str, *, probabilities: bool, uncertainty: bool, slab: int = CHUNK
                     ) -> tp.Iterator[tuple[tuple, np.ndarray, tp.Optional[np.ndarray], dict]]:
        """(key, labels, P_avr float16 or None, maps) per slab along axis 0: voted on the device, then copied."""
        ops, m = self.ops, self.planes
        for z0 in range(0, self.shape[0], slab):
            size = min(slab, self.shape[0] - z0)
            sums = self.buffers.slab("sums", 0, z0, size)
            counts = self.buffers.slab("counts", 0, z0, size) if self.ballots else None
            lab = (majority_vote_from_counts(counts, sums, m, ops) if vote == "majority"
                   else soft_vote_from_sums(sums, ops))
            maps = uncertainty_from_totals(sums, counts, lab, m, ops) if uncertainty else {}
            if uncertainty and self.fold:
                maps[FOLD_DISAGREEMENT] = fold_disagreement_from_sum(self.buffers.slab("fold", 0, z0, size), m, ops)
            mean = ops.convert_to_numpy(ops.cast(mean_from_sums(sums, m, ops), "float16")) if probabilities else None
            yield ((slice(z0, z0 + size), slice(0, self.shape[1])), ops.convert_to_numpy(lab), mean,
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

    def sync(x):  # device work is asynchronous: wait for it where a phase ends, so the phase times are true
        ops.convert_to_numpy(x[tuple(0 for _ in x.shape)])

    def predict_slices(source: str, axis: int, n: int, sink, desc: str) -> None:
        with bars.bar(n, desc) as bar, times.phase("predict"):
            y = None
            for j in range(0, n, batch_size):
                b = min(batch_size, n - j)
                x = ops.moveaxis(ops.cast(buffers.slab(source, axis, j, b), "float32"), axis, 0)
                y = forward(x)
                sink(axis, j, ops.moveaxis(y, 0, axis))
                bar.update(b)
            if y is not None:
                sync(y)

    rotated_about: tp.Optional[int] = None  # the axis the "rotated" buffer is rotated about
    for name in planes:
        p = PLANES[name]
        if not p.rotated:
            predict_slices("volume", p.slice_axis, shape[p.slice_axis],
                           lambda axis, j, y: acc.add(axis, j, y[..., :k], y[..., k] if fold_disagreement else None),
                           f"{name} predict")
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
            with bars.bar(shape[a], f"{name} rotate") as bar, times.phase("rotate"):
                step = rotation.planes_per_step(rot_pixels)
                for j in range(0, shape[a], step):
                    m = min(step, shape[a] - j)
                    planes_t = ops.moveaxis(buffers.slab("volume", a, j, m), a, 0)
                    rot = ops.moveaxis(ops.cast(rotation.rotate_tensor(planes_t), "float16"), 0, a)
                    buffers.update("rotated", a, j, rot, add=False)
                    bar.update(m)
                sync(buffers.slab("rotated", 0, 0, 1))
            rotated_about = a
        # Foreground classes only (background is the remainder after rotating back), and the fold channel.
        channels = k - 1 + (1 if fold_disagreement else 0)
        buffers.zeros("rotated_probabilities", rshape + (channels,), "uint8")
        predict_slices("rotated", p.slice_axis, rshape[p.slice_axis],
                       lambda axis, j, y: buffers.update("rotated_probabilities", axis, j, y[..., 1:], add=False),
                       f"{name} predict")
        if not any(PLANES[q].rotation_axis == a for q in planes[list(planes).index(name) + 1:]):
            buffers.free("rotated")
            rotated_about = None
        with bars.bar(shape[a], f"{name} rotate back") as bar, times.phase("rotate_back"):
            step = rotation.planes_per_step(plane_shape[0] * plane_shape[1], channels)
            for j in range(0, shape[a], step):
                m = min(step, shape[a] - j)
                block = ops.moveaxis(buffers.slab("rotated_probabilities", a, j, m), a, 0)
                back = rotation.unrotate_tensor(ops.cast(block, "float32"), plane_shape)
                probs = foreground_to_probabilities(back[..., :k - 1])
                fold = (ops.moveaxis(ops.cast(ops.clip(ops.round(back[..., k - 1]), 0, 255), "uint8"), 0, a)
                        if fold_disagreement else None)
                acc.add(a, j, ops.moveaxis(probs, 0, a), fold)
                bar.update(m)
            sync(buffers.slab("sums", 0, 0, 1))
        buffers.free("rotated_probabilities")
        acc.planes += 1
    buffers.free("volume")
    return acc
