r"""Neural-network optimizees: image classifiers (MLP, the papers' Conv net, ResNet-20, any timm model).

Every task is the mean cross-entropy of an ``nn.Module`` on a minibatch,

.. math:: f(\theta; B) = \frac{1}{|B|} \sum_{(x, y) \in B} -\log \operatorname{softmax}(m_\theta(x))_y,

evaluated with :func:`torch.func.functional_call`, so ``loss(params, batch)`` is a pure function of
the flat parameter dict (``{"fc1.weight": ..., ...}``, the module's ``named_parameters()``).
Batch norm layers use the statistics of the current batch and keep no running statistics (in
training *and* evaluation), which keeps the loss pure and ``torch.func``-transformable.

``init_params(generator)`` builds a fresh module with PyTorch's (or timm's) default initialisation,
with the global RNG temporarily seeded from ``generator`` (restored afterwards): the same
distribution in meta-training and meta-testing, reproducible from the generator's seed.

Data comes from :func:`learned_optim.tasks.data.load_splits` (digits by default, or MNIST /
Fashion-MNIST / CIFAR-10 from ``data_root``). ``batch("train", g)`` draws ``batch_size`` examples
without replacement; ``batch("val" | "test", g)`` returns the whole split (or ``eval_batch_size``
examples when set).
"""

from __future__ import annotations

import abc
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import data as data_lib
from ._common import build_functional_module, check_split, child_seed, family_config, resolve_dtype
from .base import Params, Task, TaskFamily

__all__ = [
    "ACTIVATIONS",
    "ClassificationTask",
    "ImageClassificationFamily",
    "MLPFamily",
    "ConvFamily",
    "ResNetFamily",
    "TimmFamily",
    "build_mlp",
    "build_conv_net",
    "ResNet",
    "PRESETS",
]

#: Activation names accepted by the MLP / Conv families.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------------------------------
# Architectures


def build_mlp(
    input_shape: Sequence[int], hidden_sizes: Sequence[int], num_classes: int, activation: str
) -> nn.Sequential:
    """Flatten -> [Linear -> activation] per hidden size -> Linear. Parameters ``fc1.weight``, ..."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = 1
    for s in input_shape:
        width *= int(s)
    for i, h in enumerate(hidden_sizes, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"act{i}"] = _activation(activation)
        width = h
    layers[f"fc{len(hidden_sizes) + 1}"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def build_conv_net(
    input_shape: Sequence[int],
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
    num_classes: int,
    activation: str,
    pool: int,
) -> nn.Sequential:
    """The papers' Conv optimizee: [Conv(k x k, "same" padding) -> activation] per layer ->
    MaxPool(pool) -> Flatten -> Linear.

    With the defaults ``channels=(16, 32)``, ``kernel_sizes=(3, 5)``, ``pool=2`` this is "conv 3x3x16,
    conv 5x5x32, max-pool, one FC". Padding ``k // 2`` keeps the spatial size until the pool, so
    the net works on 8x8 digits (FC input 32 * 4 * 4) as well as on 28x28 MNIST (32 * 14 * 14).
    """
    if len(channels) != len(kernel_sizes):
        raise ValueError(f"channels {channels} and kernel_sizes {kernel_sizes} differ in length")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = int(input_shape[0])
    for i, (c, k) in enumerate(zip(channels, kernel_sizes, strict=True), start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, c, k, padding=k // 2)
        layers[f"act{i}"] = _activation(activation)
        cin = c
    layers["pool"] = nn.MaxPool2d(pool)
    layers["flatten"] = nn.Flatten()
    with torch.no_grad():
        width = nn.Sequential(layers)(torch.zeros(1, *input_shape)).shape[1]
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _batch_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _batch_norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _batch_norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth ``6n + 2`` (20 -> n = 3 blocks per stage),
    stages of ``widths`` (16, 32, 64) channels with strides 1, 2, 2, global average pool, Linear.
    Batch norm uses batch statistics only (see the module docstring)."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 20, widths: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = _batch_norm(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(_BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------------
# The task


class ClassificationTask(Task):
    """Mean cross-entropy of ``build_module()`` on labelled images (see the module docstring).

    Args:
        build_module: returns a freshly initialised module (called under a seeded global RNG).
        splits: ``{"train"|"val"|"test": (x, y)}`` tensors already in the task's dtype and device.
        batch_size: training minibatch size (``None``: the whole train split).
        eval_batch_size: val/test batch size (``None``: the whole split).
        num_classes: for :meth:`metrics`.
    """

    def __init__(
        self,
        build_module: Callable[[], nn.Module],
        splits: Mapping[str, tuple[Tensor, Tensor]],
        *,
        batch_size: int | None,
        eval_batch_size: int | None,
        num_classes: int,
        dtype: torch.dtype,
        device: torch.device,
        name: str,
    ) -> None:
        self._build = build_module
        self.splits = dict(splits)
        self.batch_size, self.eval_batch_size, self.num_classes = batch_size, eval_batch_size, num_classes
        self.dtype, self.device, self.name = dtype, device, name
        #: The module whose forward ``loss`` runs with the given parameters (its own weights unused).
        self.module = self._fresh_module(seed=0)
        self.param_names = frozenset(n for n, _ in self.module.named_parameters())

    def _fresh_module(self, seed: int) -> nn.Module:
        return build_functional_module(self._build, seed, self.device, self.dtype)

    def init_params(self, generator: torch.Generator) -> Params:
        module = self._fresh_module(child_seed(generator))
        return {n: p.detach() for n, p in module.named_parameters()}

    def batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        x, y = self.splits[split]
        size = self.batch_size if split == "train" else self.eval_batch_size
        if size is None or size >= len(y):
            return x, y
        idx = torch.randperm(len(y), generator=generator)[:size].to(y.device)
        return x[idx], y[idx]

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        if params.keys() != self.param_names:
            missing, extra = self.param_names - params.keys(), params.keys() - self.param_names
            raise KeyError(
                f"{self.name}: parameter names differ from the module's (missing "
                f"{sorted(missing)}, unexpected {sorted(extra)})"
            )
        return functional_call(self.module, dict(params), (x,))

    def loss(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    @torch.no_grad()
    def metrics(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        """``{"loss": mean cross-entropy, "accuracy": fraction of argmax predictions equal to y}``."""
        x, y = batch
        logits = self.logits(params, x)
        return {
            "loss": float(F.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(dim=-1) == y).float().mean()),
        }


# --------------------------------------------------------------------------------------------------
# Families


class ImageClassificationFamily(TaskFamily):
    """Shared data handling of the image-classification families (subclasses define the net).

    Data args:
        dataset: ``"digits"`` (default, embedded), ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``.
        data_root, download, val_fraction, split_seed, verify_checksums: passed to
            :func:`learned_optim.tasks.data.load_splits` (no download unless ``download=True``).
        image_size, image_channels: resize the images / convert them to 1 or 3 channels (``None``: native).
        batch_size: training minibatch (128, the papers'); ``None``: full batch.
        eval_batch_size: val/test batch (``None``: the whole split).
        n_train: keep a random subset of this many training examples, drawn per task.
        train_shard: ``(i, k)``: keep only the i-th of k equal contiguous parts of the (seeded,
            shuffled) train split, e.g. ``(0, 2)`` for meta-training and ``(1, 2)`` for meta-test
            training, as in the learning-regularizers paper.
        label_noise: probability that a train/val label is replaced by a different, uniformly drawn
            class (drawn per task; test labels stay clean).
        dtype, device: of the data and parameters.
    """

    def __init__(
        self,
        *,
        dataset: str = "digits",
        data_root: str | os.PathLike | None = None,
        download: bool = False,
        image_size: int | None = None,
        image_channels: int | None = None,
        batch_size: int | None = 128,
        eval_batch_size: int | None = None,
        n_train: int | None = None,
        train_shard: Sequence[int] | None = None,
        label_noise: float = 0.0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        verify_checksums: bool = True,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        if data_root is not None:
            self.config["data_root"] = os.fspath(data_root)
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
        for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("n_train", n_train)):
            if size is not None and size < 1:  # (a negative size sliced from the end, 0 gave empty batches)
                raise ValueError(f"{name} must be a positive number of examples or None, got {size}")
        self.dataset = data_lib.canonical_name(dataset)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.n_train, self.label_noise = n_train, label_noise
        self.train_shard = None if train_shard is None else (int(train_shard[0]), int(train_shard[1]))
        if self.train_shard is not None and not 0 <= self.train_shard[0] < self.train_shard[1]:
            raise ValueError(f"train_shard must be (i, k) with 0 <= i < k, got {train_shard}")
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        splits = data_lib.load_splits(
            self.dataset,
            data_root=data_root,
            download=download,
            image_size=image_size,
            channels=image_channels,
            val_fraction=val_fraction,
            split_seed=split_seed,
            verify_checksums=verify_checksums,
        )
        self.num_classes = splits.num_classes
        self.input_shape = splits.image_shape
        self._data = {
            s: (splits[s].x.to(self.device, self.dtype), splits[s].y.to(self.device)) for s in ("train", "val", "test")
        }

    @abc.abstractmethod
    def build_module(self) -> nn.Module:
        """A freshly initialised network for ``self.input_shape`` and ``self.num_classes``."""

    @property
    @abc.abstractmethod
    def task_name(self) -> str:
        """Name given to the sampled tasks, e.g. ``"digits-mlp20-sigmoid"``."""

    def _train_split(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self._data["train"]
        if self.train_shard is not None:
            i, k = self.train_shard
            size = len(y) // k
            x, y = x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]
        if self.n_train is not None and self.n_train < len(y):
            idx = torch.randperm(len(y), generator=generator)[: self.n_train].to(y.device)
            x, y = x[idx], y[idx]
        return x, y

    def _corrupt(self, y: Tensor, generator: torch.Generator) -> Tensor:
        flip = torch.rand(len(y), generator=generator) < self.label_noise
        offset = torch.randint(1, self.num_classes, (len(y),), generator=generator)
        return torch.where(flip.to(y.device), (y + offset.to(y.device)) % self.num_classes, y)

    def sample(self, generator: torch.Generator) -> ClassificationTask:
        splits = dict(self._data, train=self._train_split(generator))
        if self.label_noise:
            for s in ("train", "val"):
                x, y = splits[s]
                splits[s] = (x, self._corrupt(y, generator))
        return ClassificationTask(
            self.build_module,
            splits,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            num_classes=self.num_classes,
            dtype=self.dtype,
            device=self.device,
            name=self.task_name,
        )


class MLPFamily(ImageClassificationFamily):
    """MLP classifier: ``hidden_sizes`` ((20,)), ``activation`` ("sigmoid"; relu, tanh, elu, gelu),
    plus the data args of :class:`ImageClassificationFamily`. The defaults are the papers'
    meta-training task, digits MLP-20-sigmoid with batch 128."""

    name = "mlp"

    def __init__(self, *, hidden_sizes: Sequence[int] = (20,), activation: str = "sigmoid", **data: Any) -> None:
        _activation(activation)
        self.hidden_sizes, self.activation = tuple(int(h) for h in hidden_sizes), activation
        super().__init__(**data)
        self.config.update(hidden_sizes=self.hidden_sizes, activation=activation)

    def build_module(self) -> nn.Module:
        return build_mlp(self.input_shape, self.hidden_sizes, self.num_classes, self.activation)

    @property
    def task_name(self) -> str:
        return f"{self.dataset}-mlp{'x'.join(map(str, self.hidden_sizes))}-{self.activation}"


class ConvFamily(ImageClassificationFamily):
    """The papers' Conv net (:func:`build_conv_net`): ``channels`` ((16, 32)), ``kernel_sizes``
    ((3, 5)), ``activation`` ("relu"), ``pool`` (2), plus the data args."""

    name = "conv"

    def __init__(
        self,
        *,
        channels: Sequence[int] = (16, 32),
        kernel_sizes: Sequence[int] = (3, 5),
        activation: str = "relu",
        pool: int = 2,
        **data: Any,
    ) -> None:
        _activation(activation)
        self.conv_channels = tuple(int(c) for c in channels)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if len(self.conv_channels) != len(self.kernel_sizes):
            raise ValueError(f"channels {channels} and kernel_sizes {kernel_sizes} differ in length")
        self.activation, self.pool = activation, pool
        super().__init__(**data)
        self.config.update(
            channels=self.conv_channels, kernel_sizes=self.kernel_sizes, activation=activation, pool=pool
        )

    def build_module(self) -> nn.Module:
        return build_conv_net(
            self.input_shape, self.conv_channels, self.kernel_sizes, self.num_classes, self.activation, self.pool
        )

    @property
    def task_name(self) -> str:
        return f"{self.dataset}-conv{'-'.join(map(str, self.conv_channels))}"


class ResNetFamily(ImageClassificationFamily):
    """CIFAR-style :class:`ResNet` (``depth`` 20, ``widths`` (16, 32, 64)), plus the data args."""

    name = "resnet"

    def __init__(self, *, depth: int = 20, widths: Sequence[int] = (16, 32, 64), **data: Any) -> None:
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2, got {depth}")
        self.depth, self.widths = depth, tuple(int(w) for w in widths)
        super().__init__(**data)
        self.config.update(depth=depth, widths=self.widths)

    def build_module(self) -> nn.Module:
        return ResNet(self.input_shape[0], self.num_classes, self.depth, self.widths)

    @property
    def task_name(self) -> str:
        return f"{self.dataset}-resnet{self.depth}"


class TimmFamily(ImageClassificationFamily):
    """Any timm model as an optimizee: ``timm.create_model(model_name, pretrained=False,
    num_classes=<data classes>, in_chans=<data channels>, **model_kwargs)``.

    ``model_name`` ("test_resnet", a tiny ResNet; e.g. "resnet10t", "resnet18"), ``model_kwargs``
    (None), ``image_size`` (32: digits are upsampled from 8x8, MNIST from 28x28), plus the data args.
    Batch norm layers are switched to batch statistics (see the module docstring).
    """

    name = "timm"

    def __init__(
        self,
        *,
        model_name: str = "test_resnet",
        model_kwargs: Mapping[str, Any] | None = None,
        image_size: int | None = 32,
        **data: Any,
    ) -> None:
        import timm

        if not timm.is_model(model_name):
            raise ValueError(f"timm has no model {model_name!r} (see timm.list_models())")
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        super().__init__(image_size=image_size, **data)
        self.config.update(model_name=model_name, model_kwargs=self.model_kwargs)

    def build_module(self) -> nn.Module:
        import timm

        return timm.create_model(
            self.model_name,
            pretrained=False,
            num_classes=self.num_classes,
            in_chans=self.input_shape[0],
            **self.model_kwargs,
        )

    @property
    def task_name(self) -> str:
        return f"{self.dataset}-timm-{self.model_name}"


# --------------------------------------------------------------------------------------------------
# Named presets: a base family with other defaults (every argument can still be overridden)


def _preset(
    base: type[ImageClassificationFamily], name: str, doc: str, **defaults: Any
) -> type[ImageClassificationFamily]:
    def __init__(self: Any, **config: Any) -> None:
        base.__init__(self, **{**defaults, **config})

    cls_name = "".join(part.capitalize() for part in name.replace("-", " ").split()) + "Family"
    cls = type(
        cls_name,
        (base,),
        {
            "__init__": __init__,
            "name": name,
            "preset_defaults": dict(defaults),
            "__doc__": f"{doc} Preset of :class:`{base.__name__}` with {defaults}.",
            "__module__": __name__,
        },
    )
    globals()[cls_name] = cls  # importable by name, so instances pickle
    return cast(type[ImageClassificationFamily], cls)


#: The papers' named optimizees (meta-training task and meta-test set, SPEC §6).
PRESETS: dict[str, type[ImageClassificationFamily]] = {
    cls.name: cls
    for cls in (
        _preset(MLPFamily, "digits-mlp20-sigmoid", "The papers' meta-training task (on digits)."),
        _preset(MLPFamily, "digits-mlp20-relu", "Meta-test: MLP-ReLU, one hidden layer of 20.", activation="relu"),
        _preset(
            MLPFamily,
            "digits-mlp20x20x20-relu",
            "Meta-test: a deeper MLP, three ReLU layers of 20.",
            hidden_sizes=(20, 20, 20),
            activation="relu",
        ),
        _preset(ConvFamily, "digits-conv", "Meta-test: the papers' Conv (3x3x16, 5x5x32, max-pool, FC)."),
        _preset(
            ConvFamily,
            "digits-conv4",
            "Meta-test: a larger conv net, four conv layers.",
            channels=(16, 32, 32, 64),
            kernel_sizes=(3, 3, 3, 3),
        ),
        _preset(ResNetFamily, "digits-resnet20", "Meta-test: ResNet-20."),
        _preset(TimmFamily, "digits-timm-resnet", "Meta-test: a tiny timm ResNet on 32x32 digits."),
        _preset(
            MLPFamily,
            "mnist-mlp20-sigmoid",
            "The papers' meta-training task on MNIST (needs data_root).",
            dataset="mnist",
        ),
        _preset(ConvFamily, "mnist-conv", "The papers' Conv-MNIST (needs data_root).", dataset="mnist"),
        _preset(ConvFamily, "cifar10-conv", "The papers' Conv net on CIFAR-10 (needs data_root).", dataset="cifar10"),
    )
}
