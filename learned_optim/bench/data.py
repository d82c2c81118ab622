r"""Offline data of the benchmark suite: fixed, seeded, disjoint train / validation / test splits.

Every source here is on any machine with this package's dependencies, nothing is downloaded, and none
of it is data the project reserves for independent evaluation:

* :func:`stdlib_corpus`: bytes of a fixed list of the Python standard library's own source files,
  split **by file** (:data:`STDLIB_FILES`), so no line of a validation or test file is in training.
  The text varies slightly with the Python version: :attr:`TokenSplits.fingerprint` (a SHA-256 of the
  three byte streams) is part of every task's config hash and of the results.
* :func:`tabular`: scikit-learn's bundled tables (diabetes, breast cancer) and generators
  (``make_friedman1``, ``make_classification``), cut by :func:`learned_optim.tasks.data.split_indices`
  (one seeded permutation), features (and regression targets) standardised by the train split's
  mean and standard deviation.
* :func:`shapes`: 16x16 grey images of six procedurally drawn shapes with random position, size and
  contrast plus Gaussian pixel noise; each split drawn from its own seed.
* :func:`copy_sequences`, :func:`addition_sequences`: synthetic sequence tasks; each split drawn from
  its own seed, then validation and test examples that also occur in an earlier split are dropped.

All arrays come back as :class:`ArraySplits` (``x``/``y`` tensors per split) or :class:`TokenSplits`
(one int64 token stream per split), cached in memory per argument combination: treat them as read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..tasks.data import load_splits, split_indices

__all__ = [
    "SPLITS",
    "STDLIB_FILES",
    "SELECTION_STDLIB_FILES",
    "CORPORA",
    "ArraySplits",
    "TokenSplits",
    "DataRootError",
    "fingerprint",
    "stdlib_root",
    "stdlib_corpus",
    "tabular",
    "TABLES",
    "shapes",
    "digits_splits",
    "SHAPE_NAMES",
    "copy_sequences",
    "addition_sequences",
]

SPLITS = ("train", "val", "test")

#: Standard-library source files of the byte-level corpus, per split (paths relative to the stdlib
#: folder; all present in CPython 3.9-3.13). Split by file: the three lists share no file.
STDLIB_FILES: dict[str, tuple[str, ...]] = {
    "train": (
        "argparse.py",
        "inspect.py",
        "typing.py",
        "dataclasses.py",
        "subprocess.py",
        "tarfile.py",
        "enum.py",
        "threading.py",
        "functools.py",
        "pydoc.py",
        "difflib.py",
        "ftplib.py",
        "imaplib.py",
        "smtplib.py",
        "mailbox.py",
    ),
    "val": ("configparser.py", "textwrap.py", "string.py"),
    "test": ("shutil.py", "calendar.py", "fractions.py"),
}
#: The selection set's corpus (:data:`learned_optim.bench.tasks.SELECTION_TASKS`): other standard-library files, none of
#: them in :data:`STDLIB_FILES`, so choosing a recipe never reads the suite's text.
SELECTION_STDLIB_FILES: dict[str, tuple[str, ...]] = {
    "train": (
        "pickle.py",
        "locale.py",
        "gettext.py",
        "csv.py",
        "heapq.py",
        "bisect.py",
        "random.py",
        "statistics.py",
        "tokenize.py",
        "ast.py",
    ),
    "val": ("sched.py", "queue.py", "shlex.py"),
    "test": ("glob.py", "fnmatch.py", "colorsys.py"),
}
#: Corpus name -> its files per split.
CORPORA: dict[str, dict[str, tuple[str, ...]]] = {"suite": STDLIB_FILES, "selection": SELECTION_STDLIB_FILES}


class DataRootError(FileNotFoundError):
    """A data folder is missing or lacks the files a task needs (the message names them)."""


def fingerprint(*tensors: Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes: the identity of a data set."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ArraySplits:
    """Inputs ``x[split]`` and targets ``y[split]`` of the train / val / test splits."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(*(t for s in SPLITS for t in (self.x[s], self.y[s])))

    def sizes(self) -> dict[str, int]:
        return {s: len(self.y[s]) for s in SPLITS}


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    """One int64 token stream per split (bytes, vocabulary 256)."""

    tokens: dict[str, Tensor]

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(*(self.tokens[s] for s in SPLITS))

    def sizes(self) -> dict[str, int]:
        return {s: len(self.tokens[s]) for s in SPLITS}


# ------------------------------------------------------------------------------------------ text
def stdlib_root() -> Path:
    """The folder of this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_corpus(root: str | os.PathLike | None = None, corpus: str = "suite") -> TokenSplits:
    """The byte-level corpus ``corpus`` of :data:`CORPORA` (:data:`STDLIB_FILES` or
    :data:`SELECTION_STDLIB_FILES`) read from ``root`` (default :func:`stdlib_root`).

    Each split is its files' bytes joined in the listed order with a newline between files.
    Raises :class:`DataRootError` naming the folder and the missing files.
    """
    if corpus not in CORPORA:
        raise KeyError(f"unknown corpus {corpus!r}; known: {sorted(CORPORA)}")
    folder = Path(root) if root is not None else stdlib_root()
    if not folder.is_dir():
        raise DataRootError(f"data root {str(folder)!r} is not a folder (it should hold the Python standard library)")
    missing = [f for files in CORPORA[corpus].values() for f in files if not (folder / f).is_file()]
    if missing:
        raise DataRootError(f"data root {str(folder)!r} lacks the standard-library files {missing}")
    tokens = {}
    for split, files in CORPORA[corpus].items():
        data = b"\n".join((folder / f).read_bytes() for f in files)
        tokens[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    return TokenSplits(tokens)


# ------------------------------------------------------------------------------------------ tables
def _standardise(x: dict[str, Tensor]) -> dict[str, Tensor]:
    mean, std = x["train"].mean(0), x["train"].std(0).clamp_min(1e-8)
    return {s: (v - mean) / std for s, v in x.items()}


def _cut(x: Tensor, y: Tensor, sizes: tuple[int, int, int], seed: int) -> tuple[dict, dict]:
    idx = split_indices(len(y), sizes, seed)
    return dict(zip(SPLITS, (x[i] for i in idx), strict=True)), dict(zip(SPLITS, (y[i] for i in idx), strict=True))


def _diabetes() -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32), "regression"


def _breast_cancer() -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64), "classification"


def _friedman() -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=6000, n_features=10, noise=1.0, random_state=0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), "regression"


def _classification(**params: Any) -> tuple[Tensor, Tensor, str]:
    """A scikit-learn ``make_classification`` table drawn with ``params``."""
    from sklearn.datasets import make_classification

    x, y = make_classification(**params)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64), "classification"


def _wine() -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import load_wine

    d = load_wine()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64), "classification"


#: name -> (loader, (train, val, test) sizes).
TABLES: dict[str, tuple[Callable[[], tuple[Tensor, Tensor, str]], tuple[int, int, int]]] = {
    "diabetes": (_diabetes, (266, 88, 88)),  # sklearn load_diabetes: 442 patients, 10 features
    "breast-cancer": (_breast_cancer, (341, 114, 114)),  # sklearn load_breast_cancer: 569, 30 features
    "friedman1": (_friedman, (4000, 1000, 1000)),  # sklearn make_friedman1, noise 1.0
    "classification40": (  # sklearn make_classification, 6 classes
        functools.partial(
            _classification,
            n_samples=6000,
            n_features=40,
            n_informative=16,
            n_redundant=8,
            n_classes=6,
            n_clusters_per_class=3,
            class_sep=1.5,
            flip_y=0.0,
            random_state=0,
        ),
        (4000, 1000, 1000),
    ),
    # the selection set's (learned_optim.bench.tasks.SELECTION_TASKS)
    "wine": (_wine, (106, 36, 36)),  # sklearn load_wine: 178 wines, 13 features, 3 cultivars
    "classification24": (  # sklearn make_classification, 4 classes
        functools.partial(
            _classification,
            n_samples=5000,
            n_features=24,
            n_informative=12,
            n_redundant=4,
            n_classes=4,
            n_clusters_per_class=2,
            class_sep=1.0,
            flip_y=0.02,
            random_state=7,
        ),
        (3000, 1000, 1000),
    ),
}


@functools.cache
def tabular(name: str, *, label_noise: float = 0.0, split_seed: int = 0) -> ArraySplits:
    """A table of :data:`TABLES`, split ``sizes`` by one seeded permutation and standardised by train.

    Regression targets are standardised too (so the MSE of predicting the train mean is about 1).
    ``label_noise`` (classification only): that fraction of the *train and validation* labels is
    replaced by a different class drawn uniformly (seeded); the test labels stay clean, so the test
    split measures generalisation from noisy labels.
    """
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
    loader, sizes = TABLES[name]
    x, y, kind = loader()
    xs, ys = _cut(x, y, sizes, split_seed)
    xs = _standardise(xs)
    if kind == "regression":
        mean, std = ys["train"].mean(), ys["train"].std()
        ys = {s: ((v - mean) / std).unsqueeze(1) for s, v in ys.items()}
    elif label_noise > 0:
        classes = int(y.max()) + 1
        gen = torch.Generator().manual_seed(split_seed + 12345)
        for split in ("train", "val"):
            v = ys[split].clone()
            flip = torch.rand(len(v), generator=gen) < label_noise
            shift = torch.randint(1, classes, (len(v),), generator=gen)
            v[flip] = (v[flip] + shift[flip]) % classes
            ys[split] = v
    return ArraySplits(xs, ys)


# ------------------------------------------------------------------------------------------ images
@functools.cache
def digits_splits() -> ArraySplits:
    """scikit-learn's 8x8 digits as :func:`learned_optim.tasks.data.load_splits` cuts them (1077/360/360)."""
    splits = load_splits("digits")
    return ArraySplits({s: splits[s].x for s in SPLITS}, {s: splits[s].y for s in SPLITS})


SHAPE_NAMES = ("disk", "ring", "square", "hollow-square", "plus", "x-cross")
_SHAPE_SEEDS = {"train": 101, "val": 202, "test": 303}


def _draw_shapes(n: int, size: int, noise: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, len(SHAPE_NAMES), (n,), generator=gen)
    centre = size / 2 + (torch.rand(n, 2, generator=gen) - 0.5) * (size / 2)
    radius = size / 8 + torch.rand(n, generator=gen) * (size / 6)
    contrast = 0.6 + 0.8 * torch.rand(n, generator=gen)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = (grid.view(1, size, 1) - centre[:, 0].view(n, 1, 1)).expand(n, size, size)
    dx = (grid.view(1, 1, size) - centre[:, 1].view(n, 1, 1)).expand(n, size, size)
    r = radius.view(n, 1, 1)
    dist, box = torch.sqrt(dx**2 + dy**2), torch.maximum(dx.abs(), dy.abs())
    masks = torch.stack(
        [
            dist <= r,
            (dist - r).abs() <= 0.9,
            box <= r,
            (box - r).abs() <= 0.9,
            ((dx.abs() <= 1.0) & (dy.abs() <= r)) | ((dy.abs() <= 1.0) & (dx.abs() <= r)),
            ((dx.abs() - dy.abs()).abs() <= 1.0) & (box <= r),
        ]
    ).float()
    image = masks[y, torch.arange(n)] * contrast.view(n, 1, 1)
    image = image + noise * torch.randn(n, size, size, generator=gen)
    return image.unsqueeze(1), y


@functools.cache
def shapes(n_train: int = 8000, n_eval: int = 2000, size: int = 16, noise: float = 0.35) -> ArraySplits:
    """Images of :data:`SHAPE_NAMES` (``(N, 1, size, size)``, labels ``0..5``), standardised by train."""
    xs, ys = {}, {}
    for split in SPLITS:
        n = n_train if split == "train" else n_eval
        xs[split], ys[split] = _draw_shapes(n, size, noise, torch.Generator().manual_seed(_SHAPE_SEEDS[split]))
    mean, std = xs["train"].mean(), xs["train"].std()
    return ArraySplits({s: (v - mean) / std for s, v in xs.items()}, ys)


# ------------------------------------------------------------------------------------------ sequences
def _dedupe(xs: dict[str, Tensor], ys: dict[str, Tensor]) -> tuple[dict, dict]:
    """Drop validation / test examples whose input also occurs in an earlier split (train, then val)."""
    seen = {tuple(row) for row in xs["train"].tolist()}
    for split in ("val", "test"):
        keep = [i for i, row in enumerate(xs[split].tolist()) if tuple(row) not in seen]
        seen |= {tuple(row) for row in xs[split].tolist()}
        xs[split], ys[split] = xs[split][keep], ys[split][keep]
    return xs, ys


_SEQ_SEEDS = {"train": 11, "val": 22, "test": 33}
IGNORE = -100  # targets with this value are not scored (torch's cross-entropy ignore_index default)


@functools.cache
def copy_sequences(length: int = 10, symbols: int = 8, n_train: int = 20000, n_eval: int = 2000) -> ArraySplits:
    """The copy task: read ``length`` symbols, a delimiter, then reproduce them.

    Input tokens: ``s_1..s_L, D, B x L`` (symbols ``0..symbols-1``, ``D = symbols``, blank
    ``B = symbols + 1``); targets :data:`IGNORE` for the first ``L + 1`` positions and ``s_1..s_L`` after.
    """
    xs, ys = {}, {}
    for split in SPLITS:
        n = n_train if split == "train" else n_eval
        s = torch.randint(0, symbols, (n, length), generator=torch.Generator().manual_seed(_SEQ_SEEDS[split]))
        x = torch.cat([s, torch.full((n, 1), symbols), torch.full((n, length), symbols + 1)], 1)
        y = torch.cat([torch.full((n, length + 1), IGNORE), s], 1)
        xs[split], ys[split] = x, y
    return ArraySplits(*_dedupe(xs, ys))


@functools.cache
def addition_sequences(digits: int = 10, n_train: int = 20000, n_eval: int = 2000) -> ArraySplits:
    """Addition of two ``digits``-digit numbers, least significant digit first, one digit pair per token.

    Input token ``i`` is ``10 a_i + b_i`` (``digits`` pairs, then one ``0`` pair for the last carry);
    target ``i`` is digit ``i`` of ``a + b``. The carry makes every target depend on all earlier inputs.
    """
    xs, ys = {}, {}
    for split in SPLITS:
        n = n_train if split == "train" else n_eval
        gen = torch.Generator().manual_seed(_SEQ_SEEDS[split] + 1000)
        a = torch.randint(0, 10, (n, digits), generator=gen)
        b = torch.randint(0, 10, (n, digits), generator=gen)
        a, b = (
            torch.cat([a, torch.zeros(n, 1, dtype=torch.int64)], 1),
            torch.cat([b, torch.zeros(n, 1, dtype=torch.int64)], 1),
        )
        out, carry = [], torch.zeros(n, dtype=torch.int64)
        for i in range(digits + 1):
            total = a[:, i] + b[:, i] + carry
            out.append(total % 10)
            carry = total // 10
        xs[split], ys[split] = 10 * a + b, torch.stack(out, 1)
    return ArraySplits(*_dedupe(xs, ys))
