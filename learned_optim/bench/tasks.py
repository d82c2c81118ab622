r"""The benchmark suite's tasks: realistic workloads none of the zoo was meta-trained or selected on.

A :class:`BenchTask` is a declarative recipe (model class and arguments, data source, loss, batch size,
horizon); :meth:`BenchTask.bind` loads its data and gives a :class:`Workload`, which builds the model
from a seed, draws seeded training batches and measures a split. Every optimizer on a task trains
the model of a seed from the same initialisation on the same batches.

Losses (all means over the batch): ``classify``: cross-entropy, accuracy reported; ``regress``: MSE on
standardised targets (so ~1 for predicting the mean); ``autoencode``: MSE between input and
reconstruction; ``sequence``: per-token cross-entropy over scored positions, token accuracy reported;
``lm``: next-byte cross-entropy in nats per byte over windows of ``context + 1`` bytes, next-byte
accuracy reported.

Validation values (the curve every ``steps // evals`` steps, and the tuning criterion) are measured
on a fixed subset of the validation split: its first ``eval_size`` examples (for ``lm``, ``eval_size``
windows at evenly spaced offsets of the split's byte stream); the final test values on the whole test
split (for ``lm``: ``4 * eval_size`` evenly spaced windows). Both in ``model.eval()`` mode (BatchNorm
uses its running statistics).

The zoo's meta-training used 8x8-digits MLPs with one hidden layer of ~20 sigmoid/relu/tanh units
(10-50k coordinates at most, unrolls of 100-500 steps); each task's ``differs`` field says how it
departs from that. :data:`TASKS` lists the suite; :data:`QUICK` the ``--quick`` selection.

:data:`SELECTION_TASKS` is the **recipe-selection set**, apart from the suite: tasks of the same kinds on other
data (other scikit-learn tables, other standard-library files, another sequence task) and other models, on which
recipes, ablations and regularizer weights are *chosen*, so that the suite, which *reports* quality, never
chooses anything. Its numbers are never a result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as bdata
from . import models
from .flatness import frozen_functional

__all__ = [
    "BenchTask",
    "Workload",
    "FunctionalWorkload",
    "TASKS",
    "SELECTION_TASKS",
    "QUICK",
    "QUICK_STEPS_FRACTION",
    "get_task",
    "tasks_markdown",
    "UnknownTaskError",
]

KINDS = ("classify", "regress", "autoencode", "sequence", "lm")


class UnknownTaskError(KeyError):
    """A task name that is not in :data:`TASKS` (the message lists the known ones)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _describe_callable(fn: Callable[..., Any]) -> dict[str, Any]:
    if isinstance(fn, functools.partial):
        return {"fn": _describe_callable(fn.func)["fn"], "args": list(fn.args), "kwargs": dict(fn.keywords)}
    return {"fn": f"{fn.__module__}.{fn.__qualname__}"}


@dataclasses.dataclass(frozen=True)
class BenchTask:
    """One suite task (see the module docstring).

    Attributes:
        name: registry name.
        kind: one of ``classify``, ``regress``, ``autoencode``, ``sequence``, ``lm``.
        data: a no-argument callable returning :class:`~learned_optim.bench.data.ArraySplits` or, for
            ``lm``, one taking the data root and returning :class:`~learned_optim.bench.data.TokenSplits`.
        model: a no-argument callable building the model (called under ``torch.manual_seed(seed)``).
        steps: training steps (the horizon).
        batch_size: examples (``lm``: windows) per step.
        context: ``lm`` only: bytes of context per window.
        bf16: run forward and loss under ``torch.autocast(dtype=torch.bfloat16)``.
        eval_size: examples (windows) of each evaluation subset.
        evals: number of validation measurements after step 0 (every ``steps // evals`` steps).
        source: where the data comes from and how it is split.
        compare: what a reader should compare the numbers to.
        differs: how the task differs from the zoo's meta-training tasks.
    """

    name: str
    kind: str
    data: Callable[..., Any]
    model: Callable[[], nn.Module]
    steps: int
    batch_size: int
    source: str
    compare: str
    differs: str
    context: int = 0
    bf16: bool = False
    eval_size: int = 1000
    evals: int = 20

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def uses_data_root(self) -> bool:
        return self.kind == "lm"

    def spec(self, steps: int | None = None) -> dict[str, Any]:
        """The declarative settings (no data fingerprint) with ``steps`` overriding the horizon."""
        return {
            "name": self.name,
            "kind": self.kind,
            "data": _describe_callable(self.data),
            "model": _describe_callable(self.model),
            "steps": self.steps if steps is None else steps,
            "batch_size": self.batch_size,
            "context": self.context,
            "bf16": self.bf16,
            "eval_size": self.eval_size,
            "evals": self.evals,
        }

    def bind(self, data_root: str | None = None, steps: int | None = None) -> Workload:
        """Load the data (``data_root``: folder of the text corpus, default this Python's stdlib).

        The data is made with one torch thread whatever the caller's setting: reductions (the train
        split's mean and standard deviation) round differently with other thread counts, which would
        change the data's bits and fingerprint.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            splits = self.data(data_root) if self.uses_data_root else self.data()
        finally:
            torch.set_num_threads(threads)
        return Workload(self, splits, self.steps if steps is None else int(steps))


class Workload:
    """A task bound to its data and horizon: models from seeds, seeded batches, split measurements."""

    def __init__(self, task: BenchTask, splits: Any, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.task, self.splits, self.steps = task, splits, steps
        self.eval_every = max(1, steps // task.evals)
        self._eval_cache: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.task.name

    @functools.cached_property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.build_model(0).parameters())

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """Everything that determines a run's numbers, the data fingerprint and parameter count included."""
        return {
            **self.task.spec(self.steps),
            "data_fingerprint": self.splits.fingerprint,
            "data_sizes": self.splits.sizes(),
            "parameters": self.num_parameters,
        }

    @functools.cached_property
    def config_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of :attr:`config`: changes whenever the task changes."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build_model(self, seed: int) -> nn.Module:
        """The model of ``seed`` (global RNG forked, so the caller's random state is untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.task.model()

    # ------------------------------------------------------------------ data
    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A training batch drawn with ``generator`` (uniform with replacement; ``lm``: random windows)."""
        b = self.task.batch_size
        if self.task.kind == "lm":
            tokens = self.splits.tokens["train"]
            starts = torch.randint(0, len(tokens) - self.task.context - 1, (b,), generator=generator)
            windows = tokens[starts.unsqueeze(1) + torch.arange(self.task.context + 1)]
            return windows[:, :-1], windows[:, 1:]
        x, y = self.splits.x["train"], self.splits.y["train"]
        idx = torch.randint(0, len(y), (b,), generator=generator)
        return x[idx], y[idx]

    def eval_data(self, split: str) -> tuple[Tensor, Tensor]:
        """The fixed evaluation subset of ``split`` (see the module docstring)."""
        if split not in bdata.SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {bdata.SPLITS}")
        if split not in self._eval_cache:
            n = self.task.eval_size if split != "test" else 4 * self.task.eval_size
            if self.task.kind == "lm":
                tokens, c = self.splits.tokens[split], self.task.context
                starts = torch.linspace(0, len(tokens) - c - 1, n).long()
                windows = tokens[starts.unsqueeze(1) + torch.arange(c + 1)]
                self._eval_cache[split] = (windows[:, :-1], windows[:, 1:])
            else:
                keep = slice(None) if split == "test" else slice(0, n)
                self._eval_cache[split] = (self.splits.x[split][keep], self.splits.y[split][keep])
        return self._eval_cache[split]

    # ------------------------------------------------------------------ loss
    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.task.bf16)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training objective on ``batch`` (float32 scalar)."""
        return self._loss_and_correct(model, batch)[0]

    def _loss_and_correct(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None, int]:
        x, y = batch
        with self._autocast():
            out = model(x)
        return self.score(out.float(), x, y)

    def score(self, out: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """The loss of the model's output ``out`` on ``(x, y)``, the correct predictions and the count scored."""
        kind = self.task.kind
        if kind == "regress":
            return F.mse_loss(out, y), None, len(y)
        if kind == "autoencode":
            return F.mse_loss(out, x), None, len(x)
        if kind == "classify":
            return F.cross_entropy(out, y), (out.argmax(-1) == y).sum(), len(y)
        logits, target = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        scored = target != bdata.IGNORE
        loss = F.cross_entropy(logits, target, ignore_index=bdata.IGNORE)
        return loss, ((logits.argmax(-1) == target) & scored).sum(), int(scored.sum())

    @torch.no_grad()
    def measure(self, model: nn.Module, split: str, chunk: int = 500) -> dict[str, float]:
        """Mean loss (and accuracy where it applies) on the evaluation subset of ``split``, in eval mode."""
        x, y = self.eval_data(split)
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0.0, 0
        try:
            for i in range(0, len(x), chunk):
                loss, right, n = self._loss_and_correct(model, (x[i : i + chunk], y[i : i + chunk]))
                total += float(loss) * n
                count += n
                correct += 0.0 if right is None else float(right)
        finally:
            model.train(was_training)
        values = {"loss": total / count}
        if self.task.kind in ("classify", "sequence", "lm"):
            values["accuracy"] = correct / count
        return values

    def functional(self, model: nn.Module) -> FunctionalWorkload:
        """The loss at ``model``'s weights as a pure function of the parameters (for flatness measures)."""
        return FunctionalWorkload(self, model)


class FunctionalWorkload:
    r"""A :class:`Workload`'s loss as a function of a parameter dict, at a trained model, in the interface of a
    :class:`~learned_optim.tasks.Task` (``loss(params, batch)``, ``batch(split, generator)``), so the
    :mod:`~learned_optim.bench.flatness` measures apply to the suite's models.

    The loss is the training objective in ``model.eval()`` mode (BatchNorm on its running statistics, a
    deterministic function of the parameters; buffers are copied and never updated) and in float32, without the
    task's bf16 autocast (curvature is measured in full precision). ``train`` batches are the workload's training
    batches; ``val`` and ``test`` batches are ``batch_size`` rows of the split's evaluation subset.
    """

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        self.workload = workload
        self._params, self._forward = frozen_functional(model.eval())

    def params(self) -> dict[str, Tensor]:
        """The model's trainable parameters when this was built (detached)."""
        return dict(self._params)

    def batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if split == "train":
            return self.workload.batch(generator)
        x, y = self.workload.eval_data(split)
        idx = torch.randperm(len(x), generator=generator)[: self.workload.task.batch_size]
        return x[idx], y[idx]

    def loss(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.workload.score(self._forward(params, x).float(), x, y)[0]


# ------------------------------------------------------------------------------------------ the suite
_P = functools.partial
_MLP_NOTE = "the zoo meta-trained on 1-hidden-layer width-~20 sigmoid/relu/tanh MLPs on 8x8 digits"

_STDLIB_SPLIT = "learned_optim.bench.data.STDLIB_FILES: 15 train files ~1.2 MB, 3 val, 3 test"
_LM_COMPARE = "uniform over bytes is ln 256 = 5.55 nats per byte; the train unigram model scores 3.04 on val"


def _stdlib_lm(name: str, model: Callable[[], nn.Module], corpus: str = "suite", **fields: Any) -> BenchTask:
    """A byte-level language-model task on :func:`~learned_optim.bench.data.stdlib_corpus` ``corpus`` (context 32)."""
    data = _P(bdata.stdlib_corpus) if corpus == "suite" else _P(bdata.stdlib_corpus, corpus=corpus)
    return BenchTask(name, "lm", data, model, context=32, eval_size=256, **fields)


_TASK_LIST = [
    BenchTask(
        "diabetes-mlp",
        "regress",
        _P(bdata.tabular, "diabetes"),
        _P(models.MLP, 10, (96, 96), 1, "silu"),
        steps=2000,
        batch_size=32,
        eval_size=1000,
        source="scikit-learn load_diabetes (442 patients, 10 features), seeded permutation 266/88/88, "
        "features and target standardised by train",
        compare="MSE of predicting the train mean is ~1; ridge regression reaches 0.48 test MSE",
        differs=f"regression (MSE) on tabular medical data with 266 training rows: overfitting task; {_MLP_NOTE}",
    ),
    BenchTask(
        "breast-cancer-mlp",
        "classify",
        _P(bdata.tabular, "breast-cancer"),
        _P(models.MLP, 30, (128, 128), 2, "gelu"),
        steps=1000,
        batch_size=32,
        source="scikit-learn load_breast_cancer (569 tumours, 30 features), seeded 341/114/114, standardised",
        compare="logistic regression reaches 96.5% test accuracy",
        differs=f"little data (341 rows), binary, GELU net of 21k parameters; {_MLP_NOTE}",
    ),
    BenchTask(
        "friedman-mlp-long",
        "regress",
        _P(bdata.tabular, "friedman1"),
        _P(models.MLP, 10, (128, 128), 1, "silu"),
        steps=5000,
        batch_size=64,
        source="scikit-learn make_friedman1 (6,000 rows, noise 1.0, random_state 0), seeded 4000/1000/1000, "
        "standardised",
        compare="the noise floor is ~0.04 of the target variance (noise 1.0 on a target of std ~5); "
        "ridge regression reaches 0.30 test MSE",
        differs=f"long horizon (5,000 steps, 10x the meta-training unrolls), smooth regression; {_MLP_NOTE}",
    ),
    BenchTask(
        "noisy-labels-mlp",
        "classify",
        _P(bdata.tabular, "classification40", label_noise=0.3),
        _P(models.MLP, 40, (128, 128), 6, "relu"),
        steps=2000,
        batch_size=64,
        source="scikit-learn make_classification (6 classes, 40 features, random_state 0), seeded 4000/1000/1000, "
        "30% of train and val labels replaced by another class (seeded), test labels clean",
        compare="a perfect classifier scores ~70% on the noisy val labels and 100% on the clean test labels; "
        "logistic regression reaches 56% test accuracy; memorising the noise lowers test accuracy",
        differs=f"label noise: generalisation matters more than fitting; 23k parameters, 2,000 steps; {_MLP_NOTE}",
    ),
    BenchTask(
        "shapes-cnn",
        "classify",
        _P(bdata.shapes),
        _P(models.SmallCNN, 1, 16, 6, (12, 24)),
        steps=600,
        batch_size=32,
        eval_size=500,
        source="procedurally drawn 16x16 shapes (6 classes, random position/size/contrast, Gaussian noise 0.35); "
        "8000/2000/2000 drawn from seeds 101/202/303",
        compare="chance is 16.7% (ln 6 = 1.79 nats); the tuned baselines of the same run",
        differs="a convolutional net (4 conv layers, max-pooling) on synthetic images; the zoo saw only MLPs "
        "(and an unrelated digits conv in evaluation)",
    ),
    BenchTask(
        "digits-resnet-bn",
        "classify",
        _P(bdata.digits_splits),
        _P(models.ResNetBN, 1, 10, (16, 32, 64), 1),
        steps=500,
        batch_size=32,
        source="scikit-learn's 8x8 digits through learned_optim.tasks.data.load_splits('digits'): 1077/360/360",
        compare="tuned Adam reaches 96.6% with the 20-unit ReLU MLP and 99.1% with the digits conv net of the zoo's "
        "evaluations (README)",
        differs="a residual net with BatchNorm (78k parameters, 9 conv layers) instead of a 20-unit MLP; "
        "same images as meta-training, a different model and problem geometry",
    ),
    BenchTask(
        "shapes-autoencoder-bf16",
        "autoencode",
        _P(bdata.shapes),
        _P(models.AutoEncoder, 256, (128, 32)),
        steps=1000,
        batch_size=64,
        bf16=True,
        eval_size=500,
        source="the shapes images of shapes-cnn (same splits), flattened to 256 pixels",
        compare="reconstruction MSE of the standardised pixels; predicting zero scores ~1, the Gaussian "
        "pixel noise keeps the floor above 0",
        differs="unsupervised reconstruction under bf16 autocast (forward in bfloat16, float32 master weights)",
    ),
    BenchTask(
        "copy-gru",
        "sequence",
        _P(bdata.copy_sequences),
        _P(models.SequenceRNN, 10, 8, 16, 64, "gru"),
        steps=1000,
        batch_size=32,
        source="synthetic copy task: 10 symbols of 8, a delimiter, reproduce; 20000/2000/2000 from seeds "
        "11/22/33, val/test examples seen in an earlier split dropped",
        compare="chance is ln 8 = 2.08 nats per token (12.5%); solved is ~0 nats and 100%",
        differs="a recurrent net (GRU, 16k parameters) on a memory task",
    ),
    BenchTask(
        "addition-lstm",
        "sequence",
        _P(bdata.addition_sequences),
        _P(models.SequenceRNN, 100, 10, 32, 96, "lstm"),
        steps=1000,
        batch_size=32,
        source="synthetic addition of two 10-digit numbers, digit pairs least significant first; "
        "20000/2000/2000 from seeds 1011/1022/1033, duplicates of earlier splits dropped",
        compare="chance is ln 10 = 2.30 nats per digit; the carry rule solves it exactly (~0 nats, 100%)",
        differs="an LSTM (54k parameters) learning an algorithm with long-range carries",
    ),
    _stdlib_lm(
        "stdlib-gru-lm",
        _P(models.SequenceRNN, 256, 256, 32, 128, "gru"),
        steps=600,
        batch_size=16,
        source=f"byte-level corpus of Python standard-library source files, split by file ({_STDLIB_SPLIT})",
        compare=_LM_COMPARE,
        differs="a byte-level GRU language model (103k parameters) on source code",
    ),
    _stdlib_lm(
        "stdlib-transformer-lm",
        _P(models.TransformerLM, 256, 128, 2, 4, 512, 32),
        steps=600,
        batch_size=8,
        source="the stdlib byte corpus of stdlib-gru-lm (same split by file)",
        compare=_LM_COMPARE,
        differs="a causal pre-norm transformer (2 layers, d 128, 0.46M parameters) with attention and LayerNorm",
    ),
    _stdlib_lm(
        "stdlib-transformer-lm-2m",
        _P(models.TransformerLM, 256, 256, 2, 4, 1536, 32),
        steps=500,
        batch_size=8,
        source="the stdlib byte corpus of stdlib-gru-lm (same split by file)",
        compare=_LM_COMPARE + "; the 0.46M model of stdlib-transformer-lm trains 600 steps",
        differs="a 2.2M-parameter transformer: ~50x the zoo's largest meta-training net",
    ),
]

#: The suite, by name.
TASKS: dict[str, BenchTask] = {t.name: t for t in _TASK_LIST}

_SELECTION_CORPUS = (
    "byte-level corpus of other standard-library files "
    "(learned_optim.bench.data.SELECTION_STDLIB_FILES, none of the suite's), split by file"
)

_SELECTION_LIST = [
    BenchTask(
        "select-wine-mlp",
        "classify",
        _P(bdata.tabular, "wine"),
        _P(models.MLP, 13, (64, 64), 3, "relu"),
        steps=800,
        batch_size=16,
        source="scikit-learn load_wine (178 wines, 13 features, 3 cultivars), seeded 106/36/36, standardised",
        compare="logistic regression reaches ~97% test accuracy",
        differs="little data (106 rows): generalisation matters more than fitting",
    ),
    BenchTask(
        "select-copy-lstm",
        "sequence",
        _P(bdata.copy_sequences, 8, 6),
        _P(models.SequenceRNN, 8, 6, 16, 96, "lstm"),
        steps=800,
        batch_size=32,
        source="the copy task of copy-gru with 8 symbols of 6 (same generator and seeds, other length and alphabet)",
        compare="chance is ln 6 = 1.79 nats per token; solved is ~0 nats",
        differs="an LSTM (44k parameters) on a memory task",
    ),
    # selection set v2 (session 12): the four tasks below, registered before any optimizer ran on them, replace
    # select-friedman2-wide-mlp (every optimizer at its noise floor), so that the set's interquartile mean rests
    # on seven tasks instead of four
    BenchTask(
        "select-classification-mlp",
        "classify",
        _P(bdata.tabular, "classification24"),
        _P(models.MLP, 24, (128, 128), 4, "tanh"),
        steps=1500,
        batch_size=64,
        source="scikit-learn make_classification (4 classes, 24 features, 2% flipped labels, random_state 7), "
        "seeded 3000/1000/1000, standardised",
        compare="chance is ln 4 = 1.39 nats (25%); the tuned baselines of the same run",
        differs="a tanh MLP (20k parameters) on a medium-sized synthetic table",
    ),
    BenchTask(
        "select-shapes24-cnn",
        "classify",
        _P(bdata.shapes, 4000, 1000, 24, 0.5),
        _P(models.SmallCNN, 1, 24, 6, (16, 32)),
        steps=500,
        batch_size=32,
        eval_size=500,
        source="procedurally drawn shapes as in shapes-cnn, but 24x24 pixels with Gaussian noise 0.5; 4000/1000/1000",
        compare="chance is 16.7% (ln 6 = 1.79 nats); the tuned baselines of the same run",
        differs="a wider convolutional net on larger, noisier images",
    ),
    BenchTask(
        "select-shapes12-autoencoder",
        "autoencode",
        _P(bdata.shapes, 4000, 1000, 12, 0.2),
        _P(models.AutoEncoder, 144, (64, 16)),
        steps=800,
        batch_size=64,
        eval_size=500,
        source="procedurally drawn shapes as in shapes-cnn, but 12x12 pixels with noise 0.2, flattened to 144",
        compare="reconstruction MSE of the standardised pixels; predicting zero scores ~1",
        differs="unsupervised reconstruction in float32 through a 16-unit code",
    ),
    _stdlib_lm(
        "select-stdlib-lstm-lm",
        _P(models.SequenceRNN, 256, 256, 24, 160, "lstm"),
        steps=500,
        batch_size=16,
        source=_SELECTION_CORPUS,
        compare="uniform over bytes is ln 256 = 5.55 nats per byte",
        differs="a byte-level LSTM language model (0.16M parameters)",
        corpus="selection",
    ),
    _stdlib_lm(
        "select-stdlib-transformer-wide",
        _P(models.TransformerLM, 256, 256, 1, 4, 1024, 32),
        steps=400,
        batch_size=8,
        source=_SELECTION_CORPUS,
        compare="uniform over bytes is ln 256 = 5.55 nats per byte",
        differs="a one-layer transformer of width 256 (0.93M parameters)",
        corpus="selection",
    ),
]

#: The recipe-selection set, by name (see the module docstring): never reported as a result.
SELECTION_TASKS: dict[str, BenchTask] = {t.name: t for t in _SELECTION_LIST}

#: The ``--quick`` selection (run with :data:`QUICK_STEPS_FRACTION` of their steps, 1 seed, small grids).
QUICK: tuple[str, ...] = ("diabetes-mlp", "shapes-cnn", "copy-gru", "stdlib-transformer-lm")
QUICK_STEPS_FRACTION = 0.25


def get_task(name: str, selection: bool = False) -> BenchTask:
    """The task ``name`` of :data:`TASKS` (``selection``: of :data:`SELECTION_TASKS`); :class:`UnknownTaskError`
    lists the known names otherwise."""
    registry = SELECTION_TASKS if selection else TASKS
    try:
        return registry[name]
    except KeyError:
        which = "selection-set task" if selection else "task"
        raise UnknownTaskError(f"unknown {which} {name!r}; known: {', '.join(registry)}") from None


def tasks_markdown(names: list[str] | None = None, selection: bool = False) -> str:
    """A markdown table of the tasks (``selection``: of the selection set): size, horizon, data and split, what to
    compare to, how it differs."""
    lines = [
        "| Task | Kind | Parameters | Steps (quick) | Batch | Data and split | Compare to | Unlike meta-training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names or list(SELECTION_TASKS if selection else TASKS):
        t = get_task(name, selection)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            params = sum(p.numel() for p in t.model().parameters())
        quick = f" ({max(1, round(t.steps * QUICK_STEPS_FRACTION))})" if name in QUICK else ""
        bf16 = ", bf16 autocast" if t.bf16 else ""
        lines.append(
            f"| `{name}` | {t.kind}{bf16} | {params:,} | {t.steps}{quick} | {t.batch_size} | {t.source} | "
            f"{t.compare} | {t.differs} |"
        )
    return "\n".join(lines) + "\n"
