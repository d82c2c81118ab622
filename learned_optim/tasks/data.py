"""Image-classification data for optimizee tasks: fixed, seeded, standardised (train, val, test) splits.

One entry point, :func:`load_splits`, returns a :class:`DataSplits` of float32 image tensors
``x`` of shape ``(N, C, H, W)`` and int64 labels ``y`` of shape ``(N,)`` for a data set name:

``"digits"`` (the embedded default, no download)
    scikit-learn's bundled handwritten digits (:func:`sklearn.datasets.load_digits`): 1,797 grey
    8x8 images, 10 classes. It has no official split, so one seeded permutation (``split_seed``)
    cuts it into **train 1,077 / val 360 / test 360** images (about 60 / 20 / 20 %).

``"mnist"``, ``"fashion-mnist"`` (28x28 grey) and ``"cifar10"`` (32x32 RGB)
    read through :mod:`torchvision.datasets` from ``data_root`` in torchvision's own on-disk layout
    (``<root>/MNIST/raw/*-ubyte``, ``<root>/FashionMNIST/raw/*-ubyte``,
    ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``). The official test
    split is the test split; val is a seeded ``val_fraction`` (default 10 %) of the official train
    split, train the rest: MNIST and Fashion-MNIST 54,000 / 6,000 / 10,000, CIFAR-10
    45,000 / 5,000 / 10,000. Nothing is downloaded unless ``download=True``; missing files raise
    :class:`FileNotFoundError` naming the folder, the files and how to get them. CIFAR-10's python
    batches are pickles (torchvision unpickles them): only point ``data_root`` at files you trust.

Standardisation: pixels are scaled to [0, 1], optionally resized (:func:`resize_images`), then every
split is shifted and scaled by the per-channel mean and standard deviation of the *train* split,
so the train split has mean 0 and standard deviation 1 per channel.

Results are cached in memory per argument combination (:func:`clear_cache` empties the cache). The
returned tensors are shared between callers: treat them as read-only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Split",
    "DataSplits",
    "load_splits",
    "resize_images",
    "split_indices",
    "expected_files",
    "clear_cache",
    "canonical_name",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a supported data set (before any resizing)."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    #: Whether the data comes from ``data_root`` (True) or ships with a dependency (False).
    needs_root: bool


#: Supported data set names. Aliases accepted by :func:`canonical_name`: ``fashion_mnist``,
#: ``fmnist``, ``cifar-10``, ``cifar_10``.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, needs_root=False),
    "mnist": DatasetInfo("mnist", 10, 1, 28, needs_root=True),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, needs_root=True),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, needs_root=True),
}

_ALIASES = {"fmnist": "fashion-mnist", "cifar-10": "cifar10"}

#: Digits images held out as test and as val (the other 1,077 are train).
DIGITS_TEST_SIZE = 360
DIGITS_VAL_SIZE = 360


class Split(NamedTuple):
    """One split: images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """The (train, val, test) splits of a data set; unpacks as ``train, val, test = splits``.

    ``indices[split]`` gives, for every row of the split, its index in the source arrays (for
    digits: ``load_digits()`` order; for torchvision data sets: the official train split for
    "train"/"val" and the official test split for "test").
    """

    train: Split
    val: Split
    test: Split
    info: DatasetInfo
    indices: dict[str, Tensor]
    #: Per-channel (mean, std) of the train split used to standardise all splits.
    mean: Tensor
    std: Tensor

    def __iter__(self) -> Iterator[Split]:
        return iter((self.train, self.val, self.test))

    def __getitem__(self, split: str) -> Split:
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
        return getattr(self, split)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def canonical_name(name: str) -> str:
    """Normalise a data set name (case, ``_`` vs ``-``, aliases); raise ``ValueError`` if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; supported: {sorted(DATASETS)}")
    return key


def split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """Cut ``range(n)`` into consecutive chunks of ``sizes`` of one seeded random permutation.

    The chunks are disjoint; ``sum(sizes)`` must not exceed ``n``. The permutation comes from a
    private ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched).
    """
    if sum(sizes) > n or any(s < 0 for s in sizes):
        raise ValueError(f"split sizes {sizes} do not fit in {n} items")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def resize_images(x: Tensor, image_size: int | None = None, channels: int | None = None) -> Tensor:
    """Resize ``(N, C, H, W)`` images to ``image_size`` x ``image_size`` and/or ``channels`` channels.

    Spatial resizing is bilinear (antialiased when shrinking). Grey to RGB repeats the channel;
    RGB to grey takes the luma ``0.299 R + 0.587 G + 0.114 B``. ``None`` keeps that dimension.
    """
    if channels is not None and channels != x.shape[1]:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1).contiguous()
        elif x.shape[1] == 3 and channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
            x = (x * luma.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        shrinking = image_size < min(x.shape[-2:])
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking)
    return x


_CACHE: dict[tuple, DataSplits] = {}


def clear_cache() -> None:
    """Forget every cached :class:`DataSplits`."""
    _CACHE.clear()


def load_splits(
    name: str = "digits",
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    verify_checksums: bool = True,
) -> DataSplits:
    """The standardised (train, val, test) splits of data set ``name`` (see the module docstring).

    Args:
        name: ``"digits"`` (default, embedded), ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        data_root: folder holding the torchvision data (ignored for digits).
        download: let torchvision download missing files into ``data_root`` (needs internet).
            Off by default: a missing folder or file raises :class:`FileNotFoundError`.
        image_size: resize images to this square size (e.g. 28 or 32); ``None`` keeps the native size.
        channels: convert to this many channels (1 or 3); ``None`` keeps the native channels.
        val_fraction: fraction of the official train split held out as val (torchvision data sets;
            digits always uses the fixed 1,077 / 360 / 360 split).
        split_seed: seed of the permutation that defines the splits.
        verify_checksums: for CIFAR-10, let torchvision check the files' MD5 sums (the official
            files pass; set False only for re-packed or test copies).
    """
    key_name = canonical_name(name)
    info = DATASETS[key_name]
    root = None if not info.needs_root or data_root is None else os.path.abspath(os.path.expanduser(data_root))
    key = (key_name, root, image_size, channels, float(val_fraction), int(split_seed), bool(verify_checksums))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached

    if key_name == "digits":
        x, y = _load_digits()
        n_test, n_val = DIGITS_TEST_SIZE, DIGITS_VAL_SIZE
        test_idx, val_idx, train_idx = split_indices(len(y), (n_test, n_val, len(y) - n_test - n_val), split_seed)
        x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        x_test, y_test = x[test_idx], y[test_idx]
    else:
        if root is None:
            raise FileNotFoundError(
                f"data set {key_name!r} is read from a data_root folder in torchvision's layout, but "
                f"data_root is None. Pass data_root=<folder> (with download=True to fetch it once, "
                f"needs internet), or use the embedded 'digits' data set."
            )
        (x_full, y_full), (x_test, y_test) = _load_torchvision(key_name, root, download, verify_checksums)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = round(val_fraction * len(y_full))
        val_idx, train_idx = split_indices(len(y_full), (n_val, len(y_full) - n_val), split_seed)
        test_idx = torch.arange(len(y_test))
        x_train, y_train, x_val, y_val = x_full[train_idx], y_full[train_idx], x_full[val_idx], y_full[val_idx]

    x_train, x_val, x_test = (resize_images(t, image_size, channels) for t in (x_train, x_val, x_test))
    dims = (0, 2, 3)
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    x_train, x_val, x_test = ((t - mean) / std for t in (x_train, x_val, x_test))

    result = DataSplits(
        train=Split(x_train.contiguous(), y_train),
        val=Split(x_val.contiguous(), y_val),
        test=Split(x_test.contiguous(), y_test),
        info=info,
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
        mean=mean.flatten(),
        std=std.flatten(),
    )
    _CACHE[key] = result
    return result


def _load_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a declared extra
        raise ImportError(
            "the embedded 'digits' data set needs scikit-learn: "
            "the 'meta' extra (pip install -e '.[meta]' in a checkout)"
        ) from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]


def expected_files(name: str, data_root: str | os.PathLike) -> tuple[Path, list[str]]:
    """The folder and file names torchvision requires for data set ``name`` under ``data_root``.

    Read from torchvision's own class attributes, so it follows the installed version.
    """
    name = canonical_name(name)
    cls = _torchvision_class(name)
    root = Path(data_root)
    if name == "cifar10":
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root / cls.base_folder, files
    files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    return root / cls.__name__ / "raw", files


def _load_torchvision(name: str, root: str, download: bool, verify_checksums: bool):
    """((x_train, y_train), (x_test, y_test)) of the official splits, pixels in [0, 1]."""
    cls = _torchvision_class(name)
    if not download:
        folder, files = expected_files(name, root)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            where = (
                f"data_root {root!r} does not exist (torchvision expects {files} in {folder})"
                if not Path(root).exists()
                else f"{missing} missing in {folder}"
            )
            raise FileNotFoundError(
                f"{cls.__name__} data not found: {where}. Get them with load_splits({name!r}, data_root={root!r}, "
                f"download=True) on a machine with internet, or copy an existing torchvision "
                f"'{folder.relative_to(root)}' folder there."
            )
    if name == "cifar10" and not verify_checksums:
        cls = _unverified_cifar10()
    try:
        train, test = (cls(root, train=flag, download=download) for flag in (True, False))
    except (RuntimeError, AssertionError) as e:  # AssertionError: torchvision's reader of a corrupt (e.g. MNIST) file
        raise FileNotFoundError(
            f"torchvision could not read {cls.__name__} from {root!r}: {e}"
            + (
                " (the files exist but their MD5 sums differ from the official release; pass "
                "verify_checksums=False to read them anyway)"
                if name == "cifar10" and not download
                else ""
            )
        ) from e
    return _to_tensors(train), _to_tensors(test)


def _to_tensors(ds) -> tuple[Tensor, Tensor]:
    data = torch.as_tensor(ds.data)
    x = (data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)).float().div_(255.0)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x.contiguous(), y


_UNVERIFIED_CIFAR10 = None


def _unverified_cifar10():
    """torchvision's CIFAR10 reader with its file checks reduced to "the files exist" (no MD5)."""
    global _UNVERIFIED_CIFAR10
    if _UNVERIFIED_CIFAR10 is None:
        import pickle

        from torchvision.datasets import CIFAR10

        class UnverifiedCIFAR10(CIFAR10):
            def _check_integrity(self) -> bool:
                folder = Path(self.root) / self.base_folder
                return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        _UNVERIFIED_CIFAR10 = UnverifiedCIFAR10
    return _UNVERIFIED_CIFAR10
