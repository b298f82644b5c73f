"""Muon (airbench94_muon's optimizer) as a Keras optimizer: conv kernels step along their orthogonalised momentum.

Each step, every convolution kernel is rescaled to Frobenius norm sqrt(output channels), and
then moved by the Newton-Schulz orthogonalisation of its Nesterov momentum: all directions of
the update get about the same size, whatever the gradient's scale. BatchNorm after each conv
makes the kernel's scale irrelevant to the forward pass, so its learning rate is a relative
one. Every other weight (the dense head, the BatchNorm biases) takes Keras' Nesterov SGD step.
Sources: Keller Jordan's airbench94_muon.py (cifar10-airbench) and the Muon write-up.
"""

from __future__ import annotations

import math

import keras
from keras import ops

# airbench's quintic Newton-Schulz coefficients: the steepest slope at zero that still brings
# every singular value into about [0.5, 1.5] in 3 steps (exact orthogonality is not needed).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3


def orthogonalize(matrix, steps: int = NEWTON_SCHULZ_STEPS):
    """`matrix` with its singular values pushed towards 1 (about U V^T of its SVD), by Newton-Schulz."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    # Frobenius norm 1 puts every singular value at or below 1, where the iteration converges.
    x = matrix / (ops.sqrt(ops.sum(ops.square(matrix))) + 1e-7)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:  # iterate on the wide form: the Gram matrix x x^T is then the small one
        x = ops.transpose(x)
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return ops.transpose(x) if tall else x


@keras.saving.register_keras_serializable(package="tasks")
class Muon(keras.optimizers.Optimizer):
    """Muon for conv kernels (rank-4 variables), Nesterov SGD for the rest, on one learning-rate schedule.

    A kernel's step is `learning_rate * kernel_learning_rate_scale`, so the two follow the same
    warm-up and decay. Weight decay (decoupled, term for term as Keras applies it) only matters
    for the SGD weights: a kernel's norm is reset before each step.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.85,
        kernel_learning_rate_scale: float = 1.0,
        kernel_momentum: float = 0.6,
        weight_decay: float | None = None,
        name: str = "muon",
        **kwargs,
    ):
        # Decayed in update_step, with the step's learning rate, instead of by Keras: its own decay
        # evaluates the learning-rate schedule once per variable (14 warm-up conds, 0.4 s of tracing).
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.decoupled_weight_decay = weight_decay
        self.momentum = momentum
        self.kernel_learning_rate_scale = kernel_learning_rate_scale
        self.kernel_momentum = kernel_momentum

    def build(self, variables):
        """One momentum buffer per variable, saved in each checkpoint: a resumed run keeps its momentum."""
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(variable, "momentum") for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        """Muon's step for a conv kernel, Keras' Nesterov SGD step for anything else."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        momentum = self.momentums[self._get_variable_index(variable)]
        if self.decoupled_weight_decay:
            # Keras' decoupled decay, term for term (it would run just before this step).
            decay = ops.cast(self.decoupled_weight_decay, variable.dtype)
            self.assign_sub(variable, variable * decay * learning_rate)
        if len(variable.shape) != 4:
            # keras.optimizers.SGD(nesterov=True), term for term.
            self.assign(momentum, momentum * self.momentum - gradient * learning_rate)
            self.assign_add(variable, momentum * self.momentum - gradient * learning_rate)
            return
        self.assign(momentum, momentum * self.kernel_momentum + gradient)
        nesterov = gradient + self.kernel_momentum * momentum
        outputs = variable.shape[-1]
        # (kh, kw, in, out) -> (kh * kw * in, out): one column per output channel, as airbench's rows.
        update = ops.reshape(orthogonalize(ops.reshape(nesterov, (-1, outputs))), variable.shape)
        normalized = variable * (math.sqrt(outputs) / ops.sqrt(ops.sum(ops.square(variable))))
        self.assign(variable, normalized - learning_rate * self.kernel_learning_rate_scale * update)

    def get_config(self):
        """Keras' optimizer config plus the weight decay, the two momenta and the kernels' rate scale."""
        return {
            **super().get_config(),
            "weight_decay": self.decoupled_weight_decay,
            "momentum": self.momentum,
            "kernel_learning_rate_scale": self.kernel_learning_rate_scale,
            "kernel_momentum": self.kernel_momentum,
        }
