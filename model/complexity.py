"""Analytic complexity of the paper's U-net: parameters, FLOPs and receptive field.

Baltruschat et al. 2021, "Scaling the U-net", Model section: a 2D U-net with width c0 (channels
of the first conv layer, doubled at every deeper level), depth d (encoder conv blocks of two
3x3 conv layers, each followed by a 2x2 max-pool), batch normalisation after every conv and Mish.
Fig. 3 plots mean IoU against the FLOPs of each (c0, d, IS) model.

Everything here is pure Python arithmetic over the layer list produced by :func:`conv_layers`,
which mirrors :func:`model.unet.build_unet` layer for layer (same names), so the counts are exact
and instant for every configuration, including those too big to build (c0=112, d=6 has ~1.5 G
parameters; freezing such a graph for TF's profiler needs ~14x the weight size in RAM).
No Keras or TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import typing as tp

from model.validation import (
    IntOrPair,
    check_depth,
    check_input_size,
    check_num_classes,
    check_positive_int,
    check_width,
)

#: Parameters per BatchNormalization channel: gamma, beta, moving mean, moving variance (the
#: moving statistics are non-trainable but are counted by ``keras.Model.count_params()``).
BN_PARAMS_PER_CHANNEL = 4


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One convolution of the U-net (regular or transposed), with its output size."""

    name: str  # the Keras layer name in build_unet
    kind: str  # "conv" or "transpose"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    out_height: int
    out_width: int
    batch_norm: bool  # followed by a BatchNormalization layer (named name.replace("conv", "bn"))

    @property
    def params(self) -> int:
        """Kernel + bias (+ BN gamma/beta/mean/var). Every conv has a bias (see build_unet)."""
        p = self.kernel * self.kernel * self.in_channels * self.out_channels + self.out_channels
        if self.batch_norm:
            p += BN_PARAMS_PER_CHANNEL * self.out_channels
        return p

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the kernel for one image (bias/BN not included).

        Regular conv ("same", stride 1): every output pixel reads k*k*C_in inputs per output
        channel. Transposed conv: every *input* pixel is scattered through the k*k kernel into
        C_out channels, i.e. H_in*W_in*k*k*C_in*C_out = H_out*W_out*C_in*C_out*k*k/s^2.
        """
        k2 = self.kernel * self.kernel
        pixels = self.out_height * self.out_width
        if self.kind == "conv":
            return pixels * k2 * self.in_channels * self.out_channels
        return pixels * k2 * self.in_channels * self.out_channels // (self.stride * self.stride)


def level_channels(width: int, depth: int) -> tp.List[int]:
    """Channels per resolution level: ``[c0, 2 c0, ..., 2^d c0]`` (last = bottleneck)."""
    width, depth = check_width(width), check_depth(depth)
    return [width * 2**level for level in range(depth + 1)]


def conv_layers(
    width: int,
    depth: int,
    input_size: tp.Optional[IntOrPair] = None,
    num_classes: int = 4,
    in_channels: int = 1,
) -> tp.List[ConvLayer]:
    """All convolutions of the U-net in build order (names match ``build_unet``'s layers).

    ``input_size`` (int or (H, W), a multiple of 2^depth) only sets the ``out_height`` /
    ``out_width`` fields; with ``None`` they are 0 (parameter counting needs no size).
    """
    chans = level_channels(width, depth)
    num_classes = check_num_classes(num_classes)
    in_channels = check_positive_int(in_channels, "in_channels")
    if input_size is None:
        h = w = 0
    else:
        h, w = check_input_size(input_size, depth)
    out: tp.List[ConvLayer] = []

    def block(prefix: str, cin: int, cout: int, hh: int, ww: int) -> None:
        out.append(ConvLayer(f"{prefix}_conv1", "conv", cin, cout, 3, 1, hh, ww, True))
        out.append(ConvLayer(f"{prefix}_conv2", "conv", cout, cout, 3, 1, hh, ww, True))

    cin = in_channels
    for level in range(depth):
        block(f"enc{level}", cin, chans[level], h >> level, w >> level)
        cin = chans[level]
    block("bottleneck", cin, chans[depth], h >> depth, w >> depth)
    for level in reversed(range(depth)):
        hh, ww = h >> level, w >> level
        out.append(ConvLayer(f"dec{level}_up", "transpose", chans[level + 1], chans[level], 2, 2, hh, ww, False))
        block(f"dec{level}", 2 * chans[level], chans[level], hh, ww)  # concat(skip, up)
    out.append(ConvLayer("logits", "conv", chans[0], num_classes, 1, 1, h, w, False))
    return out


def count_params(width: int, depth: int, num_classes: int = 4, *, in_channels: int = 1) -> int:
    """Number of parameters of ``build_unet(width, depth, num_classes=...)`` (== ``count_params()``).

    Paper, Model section: "the models with c0 = 96 and d = 5 have about 280 million parameters";
    this layout (bias on every conv, BN with 4 values per channel, 2x2 transposed-conv upsampling
    that halves the channels, 1x1 output conv) gives exactly 279,873,796 for c0=96, d=5.
    Independent of the input size (fully convolutional).
    """
    return sum(layer.params for layer in conv_layers(width, depth, None, num_classes, in_channels))


def count_flops(
    width: int, depth: int, input_size: IntOrPair, num_classes: int = 4, *, in_channels: int = 1
) -> int:
    """Forward-pass FLOPs for ONE image of ``input_size`` (int or (H, W)).

    FLOPs = 2 x MACs of all convolutions, the transposed (upsampling) convolutions included; BN,
    bias, Mish, pooling and concatenation are left out (they add 0.06-0.38 % in TF's profiler).
    This is the x-axis quantity of the paper's Fig. 3 (Model section / "FLOPs of each model") and
    equals, exactly, the sum of the ``Conv2D`` and ``Conv2DBackpropInput`` float-op counts of
    TensorFlow's profiler on the frozen graph. c0=32, d=3, 384x384 -> 41,344,303,104 (41.3 G).

    ``input_size`` must be a multiple of 2^depth (see ``check_input_size``); for full-slice
    inference count the padded size.
    """
    return sum(2 * layer.macs for layer in conv_layers(width, depth, input_size, num_classes, in_channels))


# ----------------------------------------------------------------------------------------------
# Receptive field
# ----------------------------------------------------------------------------------------------
# Backward interval propagation on an infinite 1-D line (the network is separable along H and W
# and uses the same layers on both axes). An interval [lo, hi] of positions in a layer's OUTPUT
# maps to the interval of positions in its INPUT that can influence them:
#   3x3 conv, stride 1, "same":           [lo - 1, hi + 1]           (k odd: +-(k-1)/2)
#   k x k max-pool, stride s, "valid":    [s*lo, s*hi + k - 1]
#   k x k transposed conv, stride s = k:  [floor(lo/s), floor(hi/s)]  (out q <- in q // s)
#   concat of several branches:           hull of the branches' input intervals
# The result is exact (no "effective RF" approximation): a pixel outside the interval has no
# path to the output pixel; every pixel inside has one (verified with gradients in the tests).


def _conv_back(lo: int, hi: int, kernel: int) -> tp.Tuple[int, int]:
    if kernel % 2 != 1:
        raise NotImplementedError("'same' conv receptive field is implemented for odd kernels")
    r = (kernel - 1) // 2
    return lo - r, hi + r


def _pool_back(lo: int, hi: int, kernel: int, stride: int) -> tp.Tuple[int, int]:
    return stride * lo, stride * hi + kernel - 1


def _transpose_back(lo: int, hi: int, kernel: int, stride: int) -> tp.Tuple[int, int]:
    if kernel != stride:
        raise NotImplementedError("transposed-conv receptive field is implemented for kernel == stride")
    return lo // stride, hi // stride  # Python floor division, also for negatives


def _block_back(lo: int, hi: int) -> tp.Tuple[int, int]:
    lo, hi = _conv_back(lo, hi, 3)
    return _conv_back(lo, hi, 3)


def _encoder_back(level: int, lo: int, hi: int) -> tp.Tuple[int, int]:
    """Interval at the output of encoder block ``level`` (level == depth: bottleneck) -> input."""
    lo, hi = _block_back(lo, hi)
    if level == 0:
        return lo, hi
    lo, hi = _pool_back(lo, hi, 2, 2)
    return _encoder_back(level - 1, lo, hi)


def _decoder_back(level: int, depth: int, lo: int, hi: int) -> tp.Tuple[int, int]:
    """Interval at the output of decoder block ``level`` (level == depth: bottleneck) -> input."""
    if level == depth:
        return _encoder_back(depth, lo, hi)
    lo, hi = _block_back(lo, hi)
    skip = _encoder_back(level, lo, hi)
    up = _decoder_back(level + 1, depth, *_transpose_back(lo, hi, 2, 2))
    return min(skip[0], up[0]), max(skip[1], up[1])


def receptive_field_interval(depth: int, position: int) -> tp.Tuple[int, int]:
    """Input pixels ``[lo, hi]`` (inclusive, one axis) that can affect output pixel ``position``.

    Coordinates are those of an unbounded image (no border effects); pooling windows start at 0,
    so the interval depends on ``position mod 2^depth``, hence the RF size varies with the
    output pixel's position (see :func:`receptive_field`). The final 1x1 conv adds nothing.
    """
    depth = check_depth(depth)
    return _decoder_back(0, depth, position, position)


def receptive_field(depth: int) -> int:
    """TRUE receptive field (pixels, per axis) of the depth-d U-net: the largest over output pixels.

    Paper, Model section, states 188, 460, 1084, 2492 for d = 3..6; the network as described
    actually sees 100, 204, 412, 828 pixels (see :func:`paper_receptive_field` for why). Derived
    by exact backward interval propagation through the whole graph (encoder, bottleneck, every
    decoder level and every skip concatenation), maximised over the 2^d output phases:
    d = 1..6 -> 18, 44, 100, 204, 412, 828, i.e. 13 * 2^d - 4 for d >= 3. Independent of width.

    The classic r_{l+1} = r_l + (k-1) j_l, j_{l+1} = j_l s recursion (with j divided by 2 at each
    2x2 upsampling) gives 13 * 2^d - 8: it misses that an output interval of odd length 5 at a
    decoder level covers 3 whole pixels (6 fine pixels) of the coarser level after floor(q / 2),
    so some output pixels see 4 more input pixels than the recursion says.
    """
    depth = check_depth(depth)
    best = 0
    for x in range(2**depth):
        lo, hi = receptive_field_interval(depth, x)
        best = max(best, hi - lo + 1)
    return best


def jump_recursion_receptive_field(depth: int, ignore_upsampling_stride: bool) -> int:
    """Textbook RF recursion along the deepest path (input -> d pools -> bottleneck -> d ups).

    r <- r + (k - 1) * j and j <- j * s for each conv/pool; for the 2x2 transposed conv
    r <- r + (k - 1) * j_eff and j <- j / 2 -- unless ``ignore_upsampling_stride``, which treats
    it as a stride-1 2x2 conv (r <- r + j, j unchanged). With ``True`` this reproduces the
    paper's numbers exactly; with ``False`` it gives 13 * 2^d - 8 (slightly below the exact
    :func:`receptive_field`, see there).
    """
    depth = check_depth(depth)
    r, j = 1.0, 1.0
    for _ in range(depth):
        r += 2 * 2 * j  # two 3x3 convs
        r += 1 * j  # 2x2 max-pool
        j *= 2
    r += 2 * 2 * j  # bottleneck block
    for _ in range(depth):
        if ignore_upsampling_stride:
            r += 1 * j  # 2x2 "conv", stride treated as 1
        else:
            j /= 2  # output pixel q reads input pixel q // 2 only: no growth, finer jump
        r += 2 * 2 * j  # two 3x3 convs
    return int(r)


def paper_receptive_field(depth: int) -> int:
    """Receptive field as stated in the paper (Model section): (5d + 9) * 2^d - 4.

    d = 3, 4, 5, 6 -> 188, 460, 1084, 2492 pixels, the paper's numbers. They are what an RF
    calculator gives when the 2x2 transposed convolutions are entered as stride-1 2x2 convs
    (:func:`jump_recursion_receptive_field` with ``ignore_upsampling_stride=True``): the jump
    (input pixels between neighbouring feature-map pixels) then stays at 2^d through the whole
    decoder, so every decoder conv is counted as if it worked at bottleneck resolution, adding
    5 * 2^d per decoder level. In the real network each upsampling halves the jump, so decoder
    level l only adds 4 * 2^l (4 * (2^d - 1) in total instead of 5 d 2^d) and the true receptive
    field (:func:`receptive_field`) is 100, 204, 412, 828: about 0.53, 0.44, 0.38, 0.33 of the
    paper's values. Kept only to reproduce/compare with the paper; report the true one.
    """
    depth = check_depth(depth)
    return (5 * depth + 9) * 2**depth - 4


# ----------------------------------------------------------------------------------------------
# GPU memory of one training replica
# ----------------------------------------------------------------------------------------------
#: Bytes per activation element by precision policy (the compute dtype; variables stay float32).
COMPUTE_BYTES = {"float32": 4, "mixed_float16": 2, "mixed_bfloat16": 2}
#: Per conv layer with BN and Mish, tensors the backward pass keeps: the conv output (BN's input),
#: the BN output (Mish's input x), tanh(softplus(x)) (Mish's gradient needs x and it), the Mish output.
TENSORS_PER_CONV_BN_MISH = 4
#: Allocator and cuDNN workspace headroom not tied to a tensor (CUDA context is outside the allocator).
FIXED_OVERHEAD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of one data-parallel training replica, in bytes, by what holds it."""

    weights: int  # float32 variables, BN moving statistics included (plus float16/bfloat16 casts under mixed)
    gradients: int  # float32, one per trainable parameter
    optimizer: int  # Adam's first and second moments, float32
    activations: int  # tensors kept for the backward pass, for the whole per-replica batch
    workspace: int  # transient gradient buffers of the largest layer + fixed allocator/cuDNN headroom

    @property
    def state(self) -> int:
        """What does not depend on the batch: weights, gradients and optimizer state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.activations + self.workspace


def trainable_params(width: int, depth: int, num_classes: int = 4, *, in_channels: int = 1) -> int:
    """Parameters with a gradient: all of :func:`count_params` but BN's moving mean and variance."""
    layers = conv_layers(width, depth, None, num_classes, in_channels)
    return count_params(width, depth, num_classes, in_channels=in_channels) - sum(
        2 * layer.out_channels for layer in layers if layer.batch_norm)


def training_memory(width: int, depth: int, input_size: IntOrPair, batch_per_replica: int, precision: str,
                    num_classes: int = 4, *, in_channels: int = 1) -> MemoryEstimate:
    """Peak GPU memory of one replica training the paper's U-net (Adam, sparse cross-entropy).

    Counts, per replica (MirroredStrategy keeps a full copy of everything on each GPU):
    * weights: every variable in float32 (4 B/param, BN statistics included); under a mixed policy
      also the float16/bfloat16 copy of each trainable weight that the layers compute with (2 B);
    * gradients: 4 B per trainable parameter; optimizer: Adam's m and v, 8 B per trainable parameter
      (a test checks weights and optimizer against Keras' own variables);
    * activations kept for the backward pass, per image, in the compute dtype: 4 tensors per
      conv-BN-Mish layer (conv out, BN out, tanh(softplus), Mish out), each max-pool output, each
      transposed-conv output and concatenation, the input; float32 logits and softmax;
    * workspace: twice the largest single activation of the batch (gradient in flight) + 1 GiB for
      the allocator's fragmentation and cuDNN workspaces.
    Not counted: the CUDA context (~0.3–0.5 GB, outside TensorFlow's/XLA's allocator), input
    pipeline prefetch buffers on the GPU, and XLA fusion that frees intermediates (lowers the peak).
    """
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision must be one of {sorted(COMPUTE_BYTES)}, got {precision!r}")
    batch = check_positive_int(batch_per_replica, "batch_per_replica")
    act_bytes = COMPUTE_BYTES[precision]
    h, w = check_input_size(input_size, depth)
    layers = conv_layers(width, depth, (h, w), num_classes, in_channels)
    params = count_params(width, depth, num_classes, in_channels=in_channels)
    trainable = trainable_params(width, depth, num_classes, in_channels=in_channels)
    weights = 4 * params + (2 * trainable if precision != "float32" else 0)
    per_image = h * w * in_channels  # the input
    largest = 0
    for layer in layers:
        size = layer.out_height * layer.out_width * layer.out_channels
        largest = max(largest, size)
        if layer.batch_norm:
            per_image += TENSORS_PER_CONV_BN_MISH * size
        elif layer.kind == "transpose":
            per_image += 3 * size  # its output, and the concatenation with the skip (2x its channels)
    per_image *= act_bytes
    for level in range(depth):  # max-pool outputs
        per_image += (h >> (level + 1)) * (w >> (level + 1)) * width * 2**level * act_bytes
    per_image += 2 * h * w * num_classes * 4  # float32 logits and softmax
    return MemoryEstimate(weights=weights, gradients=4 * trainable, optimizer=8 * trainable,
                          activations=batch * per_image,
                          workspace=2 * batch * largest * act_bytes + FIXED_OVERHEAD_BYTES)


def inference_memory_per_slice(width: int, depth: int, slice_size: IntOrPair, precision: str = "float32",
                               num_classes: int = 4, *, in_channels: int = 1) -> int:
    """Bytes one full slice (padded to a multiple of 2^depth) holds while it goes through the U-net for inference.

    Nothing is kept for a backward pass: the encoder outputs wait for their decoder level (skips), and around the
    largest layer its input, the conv output, the BN output and Mish's intermediate live at once (4 tensors);
    the float32 logits, softmax and the ensemble's running sum (3 × K channels) and the float32 input come on top.
    An upper bound under XLA, which fuses BN and Mish into the convolution."""
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision must be one of {sorted(COMPUTE_BYTES)}, got {precision!r}")
    act = COMPUTE_BYTES[precision]
    h, w = check_input_size(slice_size, depth)
    layers = conv_layers(width, depth, (h, w), num_classes, in_channels)
    skips = sum((h >> level) * (w >> level) * width * 2**level for level in range(depth))
    largest = max(layer.out_height * layer.out_width * max(layer.out_channels, layer.in_channels) for layer in layers)
    return int((skips + 4 * largest) * act + 3 * h * w * num_classes * 4 + h * w * in_channels * 4)
