"""Optimizee tasks for meta-training and evaluation.

A :class:`TaskFamily` samples :class:`Task` instances from a ``torch.Generator``; build one by name
with :func:`make_family` (all names in :data:`TASK_FAMILIES`):

========================== ====================================================================
``quadratic``              ``(1/n) sum_i ||W_i x_i - y_i||^2``, d = 10, n = 128 (SPEC §4)
``lasso``                  ``(1/n) sum_i 1/2 ||W_i x_i - y_i||^2 + 0.005 ||x_i||_1`` (SPEC §4)
``rosenbrock``             batched 2-D Rosenbrock, ``x0 ~ N(0, 1)``
``least-squares``          noisy least squares, d = 1000, train/val/test rows (SPEC §5)
``cubic-regression``       noisy cubic-polynomial regression in the monomial basis
``stepsize-quadratic``     ``1/2 w^T H w``, ``H = X^T X``, d = 20 (SPEC §5)
``mlp``, ``conv``,         image classifiers on digits (default) or MNIST / Fashion-MNIST /
``resnet``, ``timm``       CIFAR-10 from ``data_root``
``mixture``                a mixture of families (default: 18 MLP shapes on digits)
``meta-mix``               the generalist meta-training distribution: MLPs, teachers, CNNs, autoencoders,
                           transformers and GRUs on digits and generated data, random batch sizes,
                           optional parameter rescaling (:mod:`~learned_optim.tasks.distribution`)
presets                    ``digits-mlp20-sigmoid`` (the papers' meta-training task),
                           ``digits-mlp20-relu``, ``digits-mlp20x20x20-relu``, ``digits-conv``,
                           ``digits-conv4``, ``digits-resnet20``, ``digits-timm-resnet``,
                           ``mnist-mlp20-sigmoid``, ``mnist-conv``, ``cifar10-conv``
========================== ====================================================================
"""

from .base import SPLITS, Params, Task, TaskFamily
from .distribution import KINDS, MetaMixFamily, ModuleTask, RescaledTask
from .mixture import DEFAULT_MLP_MIX, MixtureFamily
from .neural import (
    ACTIVATIONS,
    PRESETS,
    ClassificationTask,
    ConvFamily,
    ImageClassificationFamily,
    MLPFamily,
    ResNet,
    ResNetFamily,
    TimmFamily,
    build_conv_net,
    build_mlp,
)
from .registry import TASK_FAMILIES, make_family, register_family
from .synthetic import (
    TEST_SIGMAS,
    TRAIN_SIGMAS,
    LassoFamily,
    LeastSquaresFamily,
    LinearRegressionTask,
    PolynomialRegressionFamily,
    QuadraticFamily,
    QuadraticTask,
    RosenbrockFamily,
    RosenbrockTask,
    StepSizeQuadraticFamily,
    StepSizeQuadraticTask,
)

__all__ = [
    "SPLITS",
    "Params",
    "Task",
    "TaskFamily",
    "TASK_FAMILIES",
    "make_family",
    "register_family",
    "TRAIN_SIGMAS",
    "TEST_SIGMAS",
    "QuadraticTask",
    "QuadraticFamily",
    "LassoFamily",
    "RosenbrockTask",
    "RosenbrockFamily",
    "LinearRegressionTask",
    "LeastSquaresFamily",
    "PolynomialRegressionFamily",
    "StepSizeQuadraticTask",
    "StepSizeQuadraticFamily",
    "ACTIVATIONS",
    "ClassificationTask",
    "ImageClassificationFamily",
    "MLPFamily",
    "ConvFamily",
    "ResNetFamily",
    "TimmFamily",
    "ResNet",
    "build_mlp",
    "build_conv_net",
    "PRESETS",
    "MixtureFamily",
    "MetaMixFamily",
    "ModuleTask",
    "RescaledTask",
    "KINDS",
    "DEFAULT_MLP_MIX",
]
