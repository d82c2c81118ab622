"""learned_optim.tasks.data: the embedded digits splits and the torchvision on-disk loading path."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from learned_optim.tasks import data


@pytest.fixture(autouse=True)
def _fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


# ------------------------------------------------------------------ digits


def test_digits_split_sizes_disjoint_and_complete():
    splits = data.load_splits("digits")
    assert [len(s.y) for s in splits] == [1077, 360, 360]
    idx = torch.cat([splits.indices[s] for s in ("train", "val", "test")])
    assert sorted(idx.tolist()) == list(range(1797))  # disjoint and covering
    train, val, test = splits
    assert train.x.shape == (1077, 1, 8, 8) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and set(train.y.unique().tolist()) == set(range(10))
    assert splits.num_classes == 10 and splits.image_shape == (1, 8, 8)


def test_digits_splits_are_seeded():
    a = data.load_splits("digits", split_seed=0)
    data.clear_cache()
    b = data.load_splits("digits", split_seed=0)
    c = data.load_splits("digits", split_seed=1)
    assert a is not b and torch.equal(a.indices["test"], b.indices["test"]) and torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.indices["test"], c.indices["test"])


def test_digits_standardised_with_train_statistics_and_cached():
    splits = data.load_splits("digits")
    assert abs(float(splits.train.x.mean())) < 1e-5
    assert float(splits.train.x.std()) == pytest.approx(1.0, abs=1e-4)
    # the same transform applies to every split: undoing it recovers the 0..16 pixel grid / 16
    raw = splits.test.x * splits.std.view(1, -1, 1, 1) + splits.mean.view(1, -1, 1, 1)
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-3)
    assert data.load_splits("digits") is splits
    assert data.load_splits("DIGITS") is splits


def test_resize_and_channels():
    splits = data.load_splits("digits", image_size=32, channels=3)
    assert splits.image_shape == (3, 32, 32)
    assert torch.equal(splits.train.x[:, 0], splits.train.x[:, 2])  # grey repeated
    rgb = torch.rand(2, 3, 4, 4)
    grey = data.resize_images(rgb, channels=1)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(grey[:, 0], expected)
    assert data.resize_images(rgb, image_size=2).shape == (2, 3, 2, 2)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="supported"):
        data.load_splits("imagenet")
    assert data.canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert data.canonical_name("cifar-10") == "cifar10"


def test_split_indices_validation():
    with pytest.raises(ValueError):
        data.split_indices(5, (3, 3), seed=0)


# ------------------------------------------------------------------ torchvision on-disk format


def _write_idx_images(path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist(root, folder="MNIST", n_train=20, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def _write_cifar10(root, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        flat = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": labels}, f)
        out[name] = (flat, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return out


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_format_folder_loads(tmp_path, name, folder):
    written = _write_mnist(tmp_path, folder)
    splits = data.load_splits(name, data_root=tmp_path, val_fraction=0.25)
    assert [len(s.y) for s in splits] == [15, 5, 6]
    assert splits.image_shape == (1, 28, 28)
    # the test split keeps the file order: undo the standardisation and compare with the pixels written
    images, labels = written["t10k"]
    raw = splits.test.x * splits.std.view(1, -1, 1, 1) + splits.mean.view(1, -1, 1, 1)
    assert torch.allclose(raw[:, 0] * 255, torch.as_tensor(images, dtype=torch.float32), atol=1e-3)
    assert splits.test.y.tolist() == labels.tolist()
    train_idx = torch.cat([splits.indices["train"], splits.indices["val"]])
    assert sorted(train_idx.tolist()) == list(range(20))
    assert splits.train.y.tolist() == (splits.indices["train"] % 10).tolist()


def test_cifar10_format_folder_loads(tmp_path):
    written = _write_cifar10(tmp_path)
    splits = data.load_splits("cifar10", data_root=tmp_path, verify_checksums=False, val_fraction=0.2)
    assert [len(s.y) for s in splits] == [16, 4, 4]
    assert splits.image_shape == (3, 32, 32)
    flat, labels = written["test_batch"]
    raw = splits.test.x * splits.std.view(1, -1, 1, 1) + splits.mean.view(1, -1, 1, 1)
    expected = torch.as_tensor(flat.reshape(-1, 3, 32, 32), dtype=torch.float32)
    assert torch.allclose(raw * 255, expected, atol=1e-3)
    assert splits.test.y.tolist() == labels


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="verify_checksums=False"):
        data.load_splits("cifar10", data_root=tmp_path)


def test_missing_root_gives_clear_error_and_never_downloads(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_download(self):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(datasets.MNIST, "download", no_download)
    monkeypatch.setattr(datasets.CIFAR10, "download", no_download)
    missing = tmp_path / "nowhere"
    for name in ("mnist", "cifar10"):
        with pytest.raises(FileNotFoundError) as err:
            data.load_splits(name, data_root=missing)
        assert str(missing) in str(err.value) and "download=True" in str(err.value)
        with pytest.raises(FileNotFoundError, match="data_root is None"):
            data.load_splits(name)


def test_partial_folder_names_missing_files(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_splits("mnist", data_root=tmp_path)
