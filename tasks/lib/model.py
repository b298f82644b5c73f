"""Model architectures: build_model(...) -> keras.Model; no compile, no IO, no device choice."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import keras
import numpy as np
from keras import layers, ops


def build_tutorial_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The tutorial's CNN, layer for layer: the [0, 255] -> [0, 1] rescale moved inside, softmax a layer of its own."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, dtype="uint8"),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(16, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(32, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(64, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.3),
            layers.Flatten(),
            layers.Dense(500, activation="relu"),
            layers.Dropout(0.4),
            layers.Dense(num_classes),
            ExactSoftmax(dtype="float32"),
        ],
        name="tutorial_cnn",
    )


# Exactly rounded layers. TensorFlow's CPU kernels for rsqrt, reciprocal, erfc and softmax start
# from the CPU's approximate reciprocal instructions (vrsqrtps, vrcpps) plus one Newton step, and
# those approximations differ between Intel and AMD: the same training gives other weights on
# each. Keras' BatchNormalization (rsqrt), GELU (erfc) and softmax use them; the layers below
# compute the same functions from sqrt, division, erf and exp, whose results are the same on
# every x86 CPU. Grappler would still rewrite x / sqrt(y) into x * rsqrt(y) when a graph runs, so
# tasks.lib.numerics.keep_graph_arithmetic turns that pass off; tests/test_numerics.py reads the graphs
# as run and checks that no training or inference graph uses any of these ops.


def _batch_normalized(x, mean, std, axes):
    """(x - mean) / std for x's own batch statistics, with batch norm's gradient in closed form.

    Autodiff through the statistics builds many more elementwise passes than the closed form
    dx = (dy - mean(dy) - y * mean(dy * y)) / std, and without a fusing compiler each pass is a
    trip through memory: with this and GELU's closed form a training step takes about 7 % less
    time in bfloat16, 3.5 % in float32 (docs/speed.md). Divisions, not a reciprocal: in a graph,
    TensorFlow rewrites 1 / y into its approximate Reciprocal.
    """

    @ops.custom_gradient
    def normalize(x, mean, std):
        normalized = (x - mean) / std

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            centred = upstream - ops.mean(upstream, axis=axes, keepdims=True)
            dx = (centred - normalized * ops.mean(upstream * normalized, axis=axes, keepdims=True)) / std
            # The statistics reach the loss only through x (the caller stops their gradient).
            return dx, ops.zeros_like(mean), ops.zeros_like(std)

        return normalized, grad

    return normalize(x, mean, std)


@keras.saving.register_keras_serializable(package="tasks")
class ExactBatchNormalization(layers.BatchNormalization):
    """BatchNormalization that divides by sqrt(variance + epsilon) instead of multiplying by rsqrt."""

    def call(self, inputs, training=None, mask=None):
        if mask is not None or self.renorm:
            raise ValueError(f"{self.name}: masks and renorm are not supported")
        inputs = ops.cast(inputs, "float32")
        shape = [1] * len(inputs.shape)
        shape[self.axis] = inputs.shape[self.axis]
        if training and self.trainable:
            mean, variance = self._moments(ops.stop_gradient(inputs), None)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            std = ops.sqrt(ops.reshape(variance, shape) + self.epsilon)
            outputs = _batch_normalized(inputs, ops.reshape(mean, shape), std, self._reduction_axes)
        else:
            mean, variance = self.moving_mean, self.moving_variance
            outputs = (inputs - ops.reshape(mean, shape)) / ops.sqrt(ops.reshape(variance, shape) + self.epsilon)
        if self.scale:
            outputs = outputs * ops.reshape(self.gamma, shape)
        if self.center:
            outputs = outputs + ops.reshape(self.beta, shape)
        return ops.cast(outputs, self.compute_dtype)


# 1 / sqrt(2) and 1 / sqrt(2 pi): GELU(x) = x * Phi(x), Phi'(x) = exp(-x^2 / 2) / sqrt(2 pi).
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@ops.custom_gradient
def _erf_gelu(x):
    """0.5 * x * (1 + erf(x / sqrt 2)), with its derivative Phi(x) + x * phi(x) in closed form."""
    one_plus_erf = 1.0 + ops.erf(x * _SQRT_HALF)

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        return upstream * (0.5 * one_plus_erf + x * (_INV_SQRT_2PI * ops.exp(-0.5 * x * x)))

    return 0.5 * x * one_plus_erf, grad


@keras.saving.register_keras_serializable(package="tasks")
class ErfGelu(layers.Layer):
    """GELU, x * Phi(x), written with erf (TensorFlow's own gelu uses erfc)."""

    def call(self, inputs):
        return _erf_gelu(inputs)


@keras.saving.register_keras_serializable(package="tasks")
class ExactSoftmax(layers.Layer):
    """Softmax over the last axis as exp(x - max) / sum, by division (TensorFlow's uses a reciprocal)."""

    def call(self, inputs):
        exponentials = ops.exp(inputs - ops.max(inputs, axis=-1, keepdims=True))
        probabilities = exponentials / ops.sum(exponentials, axis=-1, keepdims=True)
        # As Keras' own softmax does: the loss then works from the logits (softmax cross-entropy
        # with logits), not from log(probabilities), whose gradient takes a reciprocal.
        with contextlib.suppress(AttributeError):  # eager tensors take no attributes
            probabilities._keras_logits = inputs
        return probabilities


# CIFAR-10's per-channel mean and standard deviation of [0, 1] pixels: fixed, so the model
# normalises each batch itself and the arrays stay uint8 in memory (a quarter of float32).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@keras.saving.register_keras_serializable(package="tasks")
class ScaledBias(layers.Layer):
    """Adds a learned per-channel bias stored divided by `multiplier`.

    Plain SGD then moves the bias multiplier**2 times faster than other weights, at the same
    relative weight decay: airbench's 64x learning rate for BatchNorm biases (multiplier 8),
    which Keras optimizers cannot give one variable.
    """

    def __init__(self, multiplier: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.multiplier = multiplier

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + self.multiplier * self.bias

    def get_config(self):
        return {**super().get_config(), "multiplier": self.multiplier}


def _shift(images, rows: int, columns: int):
    """`images` moved by (rows, columns) pixels, the uncovered edge filled by reflection."""
    size = max(abs(rows), abs(columns))
    padded = ops.pad(images, [[0, 0], [size, size], [size, size], [0, 0]], mode="reflect")
    height, width = images.shape[1], images.shape[2]
    return padded[:, size - rows : size - rows + height, size - columns : size - columns + width, :]


@keras.saving.register_keras_serializable(package="tasks")
class RandomShift(layers.Layer):
    """While training, moves each image a random whole number of pixels (-max..max each way), edges reflected.

    airbench's random crops of reflect-padded images. Unlike keras' RandomTranslation it
    compiles under XLA (jit): each image's window is picked by a one-hot weighted sum over the
    2 max + 1 offsets, not gathered, and 1 x pixel + 0 x others is the pixel exactly.
    """

    def __init__(self, max_pixels: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_pixels = max_pixels
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        size, offsets = self.max_pixels, 2 * self.max_pixels + 1
        height, width = inputs.shape[1], inputs.shape[2]
        batch = ops.shape(inputs)[0]
        x = ops.pad(inputs, [[0, 0], [size, size], [size, size], [0, 0]], mode="reflect")
        # Rows, then columns: each image's window of the padded batch, picked by its one-hot offset.
        for rows, length in ((True, height), (False, width)):
            offset = keras.random.randint((batch,), 0, offsets, seed=self.seed_generator)
            choice = ops.one_hot(offset, offsets, dtype=inputs.dtype)
            windows = [x[:, k : k + length] if rows else x[:, :, k : k + length] for k in range(offsets)]
            x = sum(choice[:, k, None, None, None] * window for k, window in enumerate(windows))
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_pixels": self.max_pixels, "seed": self.seed}


@keras.saving.register_keras_serializable(package="tasks")
class TestTimeViews(layers.Layer):
    """At inference, appends views of the batch: shifted by `translate` pixels, and mirrored; training passes through.

    The views, in order: the images, the images moved `translate` pixels up-left and down-right
    (when translate > 0), then the mirror image of each of those (when flip).
    """

    def __init__(self, flip: bool = True, translate: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.flip = flip
        self.translate = translate

    def call(self, inputs, training=None):
        if training:
            return inputs
        views = [inputs]
        if self.translate:
            views += [_shift(inputs, -self.translate, -self.translate), _shift(inputs, self.translate, self.translate)]
        if self.flip:
            views += [ops.flip(view, axis=2) for view in views]
        return ops.concatenate(views, axis=0)

    def compute_output_shape(self, input_shape):
        # Given, not traced: JAX cannot trace a batch of unknown size into views (TensorFlow can).
        batch, *rest = input_shape
        views = len(test_time_view_weights(self.flip, self.translate))
        return (None if batch is None else batch * views, *rest)

    def get_config(self):
        return {**super().get_config(), "flip": self.flip, "translate": self.translate}


def test_time_view_weights(flip: bool, translate: int) -> tuple[float, ...]:
    """Each TestTimeViews view's weight in the prediction: half on the image, half on its shifts (airbench)."""
    weights = (0.5, 0.25, 0.25) if translate else (1.0,)
    return tuple(w / 2 for w in weights * 2) if flip else weights


@keras.saving.register_keras_serializable(package="tasks")
class MergeTestTimeViews(layers.Layer):
    """At inference, the weighted mean of each image's view logits (TestTimeViews' inverse)."""

    def __init__(self, view_weights: tuple[float, ...] = (0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.view_weights = tuple(view_weights)

    def call(self, inputs, training=None):
        if training:
            return inputs
        views = ops.split(inputs, len(self.view_weights), axis=0)
        return sum(weight * view for weight, view in zip(self.view_weights, views, strict=True))

    def compute_output_shape(self, input_shape):
        # Given, not traced: JAX cannot split a batch of unknown size into views (TensorFlow can).
        batch, *rest = input_shape
        return (None if batch is None else batch // len(self.view_weights), *rest)

    def get_config(self):
        return {**super().get_config(), "view_weights": list(self.view_weights)}


# The names models saved before test-time shifts existed use (an image and its mirror image).
@keras.saving.register_keras_serializable(package="tasks")
class FlipCopies(TestTimeViews):
    """TestTimeViews with mirror images only."""


@keras.saving.register_keras_serializable(package="tasks")
class MergeFlipCopies(MergeTestTimeViews):
    """MergeTestTimeViews of an image and its mirror image."""


# airbench's BatchNorm-bias learning-rate scale is 64 = 8**2 (see ScaledBias).
BATCHNORM_BIAS_MULTIPLIER = 8.0


def _norm_gelu(x):
    """BatchNorm (no scale; bias at 64x learning rate) then GELU, both exactly rounded."""
    # Momentum 0.6: short runs need running statistics that follow the fast-moving weights.
    x = ExactBatchNormalization(momentum=0.6, center=False, scale=False)(x)
    x = ScaledBias(BATCHNORM_BIAS_MULTIPLIER)(x)
    return ErfGelu()(x)


def _speed_block(x, width: int, name: str):
    """Conv, 2x2 max-pool, BN, GELU, then conv, BN, GELU (airbench's block)."""
    x = layers.Conv2D(width, kernel_size=3, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = _norm_gelu(layers.MaxPooling2D(pool_size=2)(x))
    x = layers.Conv2D(width, kernel_size=3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    return _norm_gelu(x)


SPEED_CNN_WIDTHS = (32, 128, 128)
STEM_KERNEL = 2
STEM_WIDTH = 2 * 3 * STEM_KERNEL**2  # each whitening direction and its negative


def build_speed_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    widths: tuple[int, ...] = SPEED_CNN_WIDTHS,
    flip: bool = False,
    translate: int = 0,
    test_time_flip: bool = False,
    test_time_translate: int = 0,
) -> keras.Model:
    """An airbench-style CNN built for accuracy per second on a CPU; augments only while training.

    Call `initialize_speed_cnn` before training: the stem's weights come from the data.
    """
    inputs = keras.Input(shape=input_shape, dtype="uint8")
    x = layers.Rescaling(1.0 / 255)(inputs)
    # Augmentation layers are identity at inference, so the saved model needs no separate copy.
    if flip:
        x = layers.RandomFlip("horizontal")(x)
    if translate:
        x = RandomShift(translate)(x)
    x = layers.Normalization(mean=CIFAR10_MEAN, variance=[s * s for s in CIFAR10_STD])(x)
    test_time_views = test_time_flip or test_time_translate
    if test_time_views:
        x = TestTimeViews(flip=test_time_flip, translate=test_time_translate)(x)
    # Frozen patch-whitening stem (initialize_speed_cnn sets it); only its bias learns.
    x = layers.Conv2D(STEM_WIDTH, STEM_KERNEL, use_bias=False, trainable=False, name="whitening")(x)
    x = ErfGelu()(ScaledBias()(x))
    for index, width in enumerate(widths, start=1):
        x = _speed_block(x, width, name=f"block{index}")
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(num_classes, use_bias=False)(x)
    # Scaled-down logits (airbench's 1/9) keep the early softmax soft at high learning rates.
    x = layers.Rescaling(1.0 / 9)(x)
    if test_time_views:
        x = MergeTestTimeViews(test_time_view_weights(test_time_flip, test_time_translate))(x)
    # Probabilities (and the loss on their logits) in float32 under a bfloat16 compute policy too.
    outputs = ExactSoftmax(dtype="float32")(x)
    return keras.Model(inputs, outputs, name="speed_cnn")


def patch_covariance(images: np.ndarray, kernel_size: int) -> np.ndarray:
    """Covariance (float64) of the k x k patches of uint8 `images`, rows in Keras conv kernel order.

    The sums run over integer pixel values in float64, where every partial sum is an exact
    integer (below 2**53 up to about 10**11 patches), so no BLAS kernel, thread count or chunking
    can change a bit of them; the one rounding is the final division, the same on every CPU.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"whitening needs uint8 images (0-255), got {images.dtype}")
    features = kernel_size * kernel_size * images.shape[-1]
    sums, products, count = np.zeros(features), np.zeros((features, features)), 0
    # Chunks bound memory (a float64 copy of 5,000 images' patches would take 460 MB).
    for chunk in np.array_split(images, max(1, len(images) // 1000)):
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (kernel_size, kernel_size), axis=(1, 2))
        # (n, h, w, c, kh, kw) -> rows of (kh, kw, c), the layout of a Keras conv kernel.
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, features).astype(np.float64)
        sums += patches.sum(axis=0)
        products += patches.T @ patches
        count += len(patches)

    def exact_entry(a: int, b: int) -> float:
        # In Python integers (count * products overflows int64 for large images); one rounding, at the division.
        return (count * int(products[a, b]) - int(sums[a]) * int(sums[b])) / (count * (count - 1))

    return np.array([[exact_entry(a, b) for b in range(features)] for a in range(features)])


def symmetric_eigh(matrix: np.ndarray, max_sweeps: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a small symmetric matrix, the same bits on every CPU.

    Cyclic Jacobi rotations in elementwise float64 arithmetic, each operation rounded once as
    IEEE 754 says. numpy's eigh runs LAPACK on OpenBLAS kernels picked per CPU (Zen's on a Zen 3,
    SkylakeX's on a Zen 4), and their last bits differ: enough, for an estimated one dataset in
    twenty or fewer, to round a weight of the float32 whitening stem differently.
    """
    a = np.array(matrix, dtype=np.float64)
    size = len(a)
    vectors = np.eye(size)
    for _ in range(max_sweeps):
        rotated = False
        for p in range(size - 1):
            for q in range(p + 1, size):
                # Below this, a rotation would not change the diagonal it is added to.
                if abs(a[p, q]) <= np.finfo(np.float64).eps / 4 * math.sqrt(abs(a[p, p] * a[q, q])):
                    continue
                rotated = True
                # The rotation that zeroes a[p, q], by the smaller of its two angles (Golub and Van Loan, 8.5.2).
                theta = (a[q, q] - a[p, p]) / (2 * a[p, q])
                tangent = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
                cosine = 1 / math.sqrt(tangent * tangent + 1)
                sine = tangent * cosine
                for view in (a.T, a, vectors.T):  # columns of a, then its rows, then the eigenvectors
                    first, second = view[p].copy(), view[q].copy()
                    view[p] = cosine * first - sine * second
                    view[q] = sine * first + cosine * second
                a[p, q] = a[q, p] = 0.0  # what the rotation was chosen for; rounding leaves a trace
        if not rotated:
            order = np.argsort(np.diag(a), kind="stable")
            return np.diag(a)[order], vectors[:, order]
    raise ValueError(f"symmetric_eigh: no convergence in {max_sweeps} sweeps (is the {size}x{size} matrix finite?)")


def whitening_kernel(images: np.ndarray, kernel_size: int = STEM_KERNEL, epsilon: float = 5e-4) -> np.ndarray:
    """Conv kernel (k, k, channels, 2 * k*k*channels) that whitens the normalised images' k x k patches.

    Its filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue),
    each also negated so a following GELU keeps both signs (airbench's whitening init).
    """
    # The model sees (x / 255 - mean) / std: the mean does not move a covariance, the scale divides it.
    scale = np.tile(255 * np.asarray(CIFAR10_STD), kernel_size * kernel_size)
    covariance = patch_covariance(images, kernel_size) / np.outer(scale, scale)
    eigenvalues, eigenvectors = symmetric_eigh(covariance)
    filters = (eigenvectors / np.sqrt(eigenvalues + epsilon)).T
    kernel = filters.reshape(-1, kernel_size, kernel_size, images.shape[-1]).transpose(1, 2, 3, 0)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


# airbench's sample size: the 12x12 patch covariance settles well before 5,000 images.
WHITENING_SAMPLE_SIZE = 5000


def whitening_sample(count: int, seed: int, size: int = WHITENING_SAMPLE_SIZE) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of `size` of `count` images (all when fewer).

    Never a prefix: the training arrays are in class order, and the first 5,000 are 90% one class.
    """
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def initialize_speed_cnn(model: keras.Model, images: np.ndarray, seed: int) -> None:
    """Whitening stem from a seeded sample of `images`; each 3x3 conv starts as identity on its first channels."""
    model.get_layer("whitening").set_weights([whitening_kernel(images[whitening_sample(len(images), seed)])])
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.name.startswith("block"):
            kernel = layer.get_weights()[0]
            inputs = min(kernel.shape[2], kernel.shape[3])
            # Dirac init (airbench): the conv first passes its input through, then learns.
            kernel[:, :, :, :inputs] = 0
            centre = kernel.shape[0] // 2
            kernel[centre, centre, np.arange(inputs), np.arange(inputs)] = 1
            layer.set_weights([kernel])


ARCHITECTURES = {"tutorial_cnn": build_tutorial_cnn, "speed_cnn": build_speed_cnn}
# Architectures whose starting weights come from the training images.
DATA_INITIALIZERS = {"speed_cnn": initialize_speed_cnn}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **options) -> keras.Model:
    """Build the named architecture for images of `input_shape` and `num_classes` classes."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(ARCHITECTURES)}") from None
    return builder(input_shape, num_classes, **options)


def initialize_from_data(name: str, model: keras.Model, images: np.ndarray, seed: int) -> None:
    """Set the data-derived starting weights of the named architecture, if it has any."""
    if name in DATA_INITIALIZERS:
        DATA_INITIALIZERS[name](model, images, seed)


def computes_in(model: keras.Model) -> str:
    """bfloat16 if any layer of `model` computes in bfloat16 (Keras' mixed_bfloat16), else float32."""
    return "bfloat16" if any(layer.compute_dtype == "bfloat16" for layer in model.layers) else "float32"


def in_float32(model: keras.Model) -> keras.Model:
    """A copy of `model` with the same (float32) weights whose every layer computes in float32."""

    def float32_layer(layer):
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, layers.InputLayer):  # inputs keep uint8
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=float32_layer)
    copy.set_weights(model.get_weights())
    return copy


# Every image is predicted in a batch of exactly this many (the last one padded): oneDNN picks its
# kernels by shape, so an image in a batch of another size can come out a rounding apart (seen:
# 62 of 64 test images at batch size 1 against 64). One shape gives an image the same bytes
# whatever arrived with it: in evaluate, promote, predict, batch inference and the service. Within
# the batch, the kernels must also treat every row alike: at 8, AVX2's (a CPU without AVX-512, or
# portable mode's cap) gave 12 of 48 images other bytes than alone, and at 6 AVX-512's did; 16 gave
# none under either (python -m bench.batch_positions, with and without ONEDNN_MAX_CPU_ISA=AVX2).
INFERENCE_BATCH = 16


def _fixed_shape_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch of exactly `batch_size` images, how many of them are real), the last one padded with zeros."""
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real, *images.shape[1:]), images.dtype)])
        yield batch, real


def predict_in_batches(model: keras.Model, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
    """The model's outputs for `images`, each computed in a batch of exactly `batch_size`."""
    # Not model.predict, which builds an autotuned tf.data pipeline for each call.
    outputs = [
        np.asarray(model.predict_on_batch(batch))[:real] for batch, real in _fixed_shape_batches(images, batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, *model.outputs[0].shape[1:]))


def with_embeddings(model: keras.Model) -> keras.Model:
    """`model` with a second output: the input of its last Dense layer, the penultimate-layer embedding."""
    dense = [layer for layer in model.layers if isinstance(layer, layers.Dense)][-1]
    return keras.Model(model.inputs, [model.outputs[0], dense.input], name=f"{model.name}_with_embeddings")


def predict_with_embeddings(
    model: keras.Model, images: np.ndarray, batch_size: int = INFERENCE_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, embeddings) of a `with_embeddings` model, each image computed in a batch of exactly `batch_size`."""
    outputs, embeddings = [], []
    for batch, real in _fixed_shape_batches(images, batch_size):
        predicted, embedded = model.predict_on_batch(batch)
        outputs.append(np.asarray(predicted)[:real])
        # Under test-time views the embeddings are of every view, the images' own first (TestTimeViews).
        embeddings.append(np.asarray(embedded)[:real])
    return np.concatenate(outputs), np.concatenate(embeddings)
