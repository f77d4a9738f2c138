"""Tests of s2h.data on small files written here (and on the real Fashion-MNIST if installed)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from s2h.data import (
    DATASETS,
    DatasetFormatError,
    DatasetNotFoundError,
    EpochSampler,
    build_dataset,
    build_loaders,
    dataset_info,
    read_idx,
    restricted_unpickle,
)

# --------------------------------------------------------------------------------------------
# helpers writing tiny dataset files
# --------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True):
    """Random uint8 images/labels in idx files; returns {split: (images, labels)}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images),
                            (f"{prefix}-labels-idx1-ubyte", labels)):  # fmt: skip
            raw = _idx_bytes(array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
        written[split] = (images, labels)
    return written


def _cifar_entry(n: int, rng: np.random.Generator, as_numpy: bool) -> dict:
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, size=(n,)).tolist()
    if as_numpy:
        return {"data": images, "fine_labels": labels, "coarse_labels": [0] * n}
    return {"data": images.tobytes(), "fine_labels": labels}


def _write_cifar(folder: Path, as_numpy: bool, protocol: int = 4, n_train=24, n_test=12):
    rng = np.random.default_rng(1)
    root = folder / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        entry = _cifar_entry(n, rng, as_numpy)
        (root / split).write_bytes(pickle.dumps(entry, protocol=protocol))
        data_ = (
            np.array(entry["data"]) if as_numpy else np.frombuffer(entry["data"], np.uint8).copy()
        )
        written[split] = (data_.reshape(n, 3, 32, 32), entry["fine_labels"])
    names = [f"name{k}" for k in range(100)]
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=protocol))
    return written


def _write_image_folder(root: Path, tiny_val: bool = False, size=(40, 30)) -> dict:
    from PIL import Image

    rng = np.random.default_rng(2)
    classes = ["n01", "n02", "n03"]
    for name in classes:
        folder = root / "train" / name / "images"  # nested, as in Tiny ImageNet
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = "JPEG" if i % 2 else "png"
            Image.fromarray(pixels).save(folder / f"{name}_{i}.{ext}")
    val = root / "val"
    if tiny_val:
        (val / "images").mkdir(parents=True)
        lines = []
        for i, name in enumerate(["n03", "n01", "n02", "n01"]):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(val / "images" / f"val_{i}.JPEG")
            lines.append(f"val_{i}.JPEG\t{name}\t0\t0\t10\t10")
        (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    else:
        for name in classes[::-1]:
            (val / name).mkdir(parents=True)
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(val / name / "v.png")
    return {name: k for k, name in enumerate(classes)}


# --------------------------------------------------------------------------------------------
# names and info
# --------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_dataset("mnist-please", "train")
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="cifar100"):
        dataset_info("nope")


def test_dataset_info():
    info = dataset_info("fashion-mnist")
    assert (info.in_chans, info.num_classes, info.image_size) == (1, 10, 28)
    assert info.default_dir == "/usr/share/datasets/fashion-mnist"
    info = dataset_info("cifar100")
    assert (info.in_chans, info.num_classes, info.image_size) == (3, 100, 32)
    info = dataset_info("synthetic")
    assert (info.in_chans, info.num_classes, info.image_size, info.default_dir) == (3, 10, 32, None)
    assert dataset_info("fashion_mnist").name == "fashion-mnist"


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", "validation")


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_sizes():
    train = build_dataset("synthetic", "train")
    test = build_dataset("synthetic", "test")
    assert (len(train), len(test)) == (2048, 512)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    again = build_dataset("synthetic", "train")
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    other = build_dataset("synthetic", "train", data_seed=1)
    assert not torch.equal(train.images, other.images)
    assert not torch.equal(train.images[:512], test.images)
    small = build_dataset("synthetic", "train", num_samples=100)
    assert len(small) == 100
    assert torch.bincount(train.targets).tolist() == [2048 // 10 + (k < 8) for k in range(10)]
    assert abs(float(train.images.mean())) < 0.05 and abs(float(train.images.std()) - 1) < 0.05


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier (fit on train) is far above chance on test."""
    train = build_dataset("synthetic", "train")
    test = build_dataset("synthetic", "test")
    means = torch.stack([train.images[train.targets == k].mean(0) for k in range(10)])
    scores = test.images.flatten(1) @ means.flatten(1).T
    accuracy = (scores.argmax(1) == test.targets).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, gz):
    written = _write_fashion_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = build_dataset("fashion-mnist", split, tmp_path, augment=False)
        images, labels = written[split]
        assert len(ds) == len(labels)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 28, 28)
        assert ds.targets.tolist() == labels.tolist()
        x, y = ds[3]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[3]
        expected = (torch.from_numpy(images[3]).float() / 255 - 0.2860) / 0.3530
        torch.testing.assert_close(x[0], expected)


def test_read_idx_generic(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, array)


def test_fashion_mnist_augmentation_train_only(tmp_path):
    _write_fashion_mnist(tmp_path)
    train = build_dataset("fashion-mnist", "train", tmp_path)  # augment defaults on for train
    test = build_dataset("fashion-mnist", "test", tmp_path)
    assert train.augment and not test.augment
    views = torch.stack([train[(5, s)][0] for s in range(8)])
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(train[(5, 3)][0], train[(5, 3)][0])  # same seed, same view
    assert torch.equal(test[2][0], test[2][0])
    plain = build_dataset("fashion-mnist", "train", tmp_path, augment=False)
    assert torch.equal(plain[5][0], plain[5][0])


def test_fashion_mnist_missing_names_dir_and_install_command(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion-mnist", "train", missing)
    message = str(err.value)
    assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message
    assert isinstance(err.value, FileNotFoundError)
    tmp_path.joinpath("partial").mkdir()
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        build_dataset("fashion-mnist", "train", tmp_path / "partial")


def test_fashion_mnist_corrupt_files_name_the_path(tmp_path):
    _write_fashion_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw[4:]))  # unknown dtype code
    with pytest.raises(DatasetFormatError, match="magic") as err:
        build_dataset("fashion-mnist", "train", tmp_path)
    assert str(bad) in str(err.value)
    bad.write_bytes(gzip.compress(raw[:-100]))  # truncated data
    with pytest.raises(DatasetFormatError, match="truncated") as err:
        build_dataset("fashion-mnist", "train", tmp_path)
    assert str(bad) in str(err.value)
    bad.write_bytes(gzip.compress(raw)[:-30])  # truncated gzip stream
    with pytest.raises(DatasetFormatError) as err:
        build_dataset("fashion-mnist", "train", tmp_path)
    assert str(bad) in str(err.value)


REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_sizes():
    train = build_dataset("fashion-mnist", "train")
    test = build_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    pixels = train.images.float().div(255)
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3


# --------------------------------------------------------------------------------------------
# CIFAR-100 (restricted unpickling)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("as_numpy", "protocol"), [(False, 4), (True, 2), (True, 4), (True, 5)])
def test_cifar100_reads_pickles(tmp_path, as_numpy, protocol):
    written = _write_cifar(tmp_path, as_numpy, protocol)
    for split in ("train", "test"):
        ds = build_dataset("cifar100", split, tmp_path, augment=False)
        images, labels = written[split]
        assert len(ds) == len(labels) and ds.targets.tolist() == labels
        assert ds.images.dtype == torch.uint8 and torch.equal(ds.images, torch.from_numpy(images))
        x, y = ds[1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[1]
        mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
        std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
        torch.testing.assert_close(x, (torch.from_numpy(images[1]).float() / 255 - mean) / std)
        assert ds.classes[7] == "name7"
    # data_dir may also be the cifar-100-python folder itself
    assert len(build_dataset("cifar100", "test", tmp_path / "cifar-100-python")) == 12


def test_cifar100_from_tar_archive(tmp_path):
    written = _write_cifar(tmp_path / "src", as_numpy=True)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    ds = build_dataset("cifar100", "train", tmp_path, augment=False)
    assert ds.targets.tolist() == written["train"][1]


def test_cifar100_augmentation_train_only(tmp_path):
    _write_cifar(tmp_path, as_numpy=True)
    train = build_dataset("cifar100", "train", tmp_path)
    test = build_dataset("cifar100", "test", tmp_path)
    views = [train[(0, s)][0] for s in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(test[0][0], test[0][0]) and not test.augment


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Evil(marker), "fine_labels": [0]})
    with pytest.raises(DatasetFormatError, match="refusing"):
        restricted_unpickle(payload, "evil")
    assert not marker.exists()
    assert b"system" in payload  # the payload names os.system (posix.system): it is live
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    (root / "train").write_bytes(payload)
    with pytest.raises(DatasetFormatError) as err:
        build_dataset("cifar100", "train", tmp_path)
    assert str(root / "train") in str(err.value)
    assert not marker.exists()
    for forbidden in (pickle.dumps(print), pickle.dumps(Path("/x")), pickle.dumps(eval)):
        with pytest.raises(DatasetFormatError):
            restricted_unpickle(forbidden)


def test_restricted_unpickler_plain_data_roundtrip():
    obj = {"a": [1, 2.5, "x", b"\x00\xff"], "arr": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    for protocol in (2, 4, 5):
        out = restricted_unpickle(pickle.dumps(obj, protocol=protocol))
        assert out["a"] == obj["a"] and np.array_equal(out["arr"], obj["arr"])
    # numpy 1.x writes numpy.core.* names (numpy 2.x numpy._core.*): both are accepted
    legacy = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct" in legacy
    assert np.array_equal(restricted_unpickle(legacy)["arr"], obj["arr"])


def test_cifar100_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cifar100", "train", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value) and "--data-dir" in str(err.value)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    (root / "train").write_bytes(pickle.dumps({"data": b"\x00" * 3072, "fine_labels": [0]})[:-9])
    with pytest.raises(DatasetFormatError) as err:
        build_dataset("cifar100", "train", tmp_path)
    assert str(root / "train") in str(err.value)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------


def test_imagefolder_class_folders(tmp_path):
    class_to_idx = _write_image_folder(tmp_path)
    train = build_dataset("imagefolder", "train", tmp_path, image_size=24)
    test = build_dataset("imagefolder", "test", tmp_path, image_size=24)
    assert len(train) == 9 and len(test) == 3 and train.classes == ["n01", "n02", "n03"]
    for path, label in train.samples:
        assert label == class_to_idx[path.parent.parent.name]
    for path, label in test.samples:
        assert label == class_to_idx[path.parent.name]
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 0
    views = [train[(4, s)][0] for s in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(test[1][0], test[1][0]) and not test.augment
    info = dataset_info("imagefolder", tmp_path)
    assert (info.in_chans, info.num_classes, info.image_size) == (3, 3, 224)
    assert build_dataset("imagefolder", "test", tmp_path)[0][0].shape == (3, 224, 224)


def test_imagefolder_tiny_imagenet_layout(tmp_path):
    _write_image_folder(tmp_path, tiny_val=True, size=(64, 64))
    test = build_dataset("imagefolder", "test", tmp_path)
    assert test.image_size == 64 and test.crop_ratio == 1.0
    assert [label for _, label in test.samples] == [2, 0, 1, 0]
    x, _ = test[0]
    assert x.shape == (3, 64, 64)
    # no crop margin at the native size: the test image is exactly the normalised file
    from PIL import Image

    pixels = np.array(Image.open(test.samples[0][0]).convert("RGB"))
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(x, (expected - mean) / std)
    assert dataset_info("imagefolder", tmp_path).image_size == 64


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("imagefolder", "train", tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "train") in str(err.value)
    (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no class folder") as err:
        build_dataset("imagefolder", "train", tmp_path / "empty")
    assert str(tmp_path / "empty" / "train") in str(err.value)
    with pytest.raises(ValueError, match="data_dir"):
        build_dataset("imagefolder", "train")


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------


def _first_batches(loader, count=2):
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if i + 1 == count:
            break
    return batches


def test_loaders_reproducible_with_seed(tmp_path):
    _write_fashion_mnist(tmp_path, n_train=64, n_test=16)
    kwargs = {"batch_size": 8, "workers": 0}
    tr1, te1, info = build_loaders("fashion-mnist", tmp_path, seed=3, **kwargs)
    tr2, _, _ = build_loaders("fashion-mnist", tmp_path, seed=3, **kwargs)
    tr3, _, _ = build_loaders("fashion-mnist", tmp_path, seed=4, **kwargs)
    assert (info.in_chans, info.num_classes, info.image_size) == (1, 10, 28)
    assert len(tr1) == 8 and len(te1) == 2
    a, b, c = _first_batches(tr1), _first_batches(tr2), _first_batches(tr3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], c[0][1]) or not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (8, 1, 28, 28) and a[0][1].dtype == torch.int64
    # the next epoch differs; set_epoch replays an epoch exactly (resume)
    epoch1 = _first_batches(tr1)
    assert not torch.equal(epoch1[0][0], a[0][0])
    tr2.sampler.set_epoch(1)
    replay = _first_batches(tr2)
    assert torch.equal(replay[0][0], epoch1[0][0]) and torch.equal(replay[1][1], epoch1[1][1])


def test_loaders_same_data_with_workers(tmp_path):
    """Order and augmentation do not depend on the number of worker processes."""
    _write_fashion_mnist(tmp_path, n_train=32, n_test=8)
    tr0, _, _ = build_loaders("fashion-mnist", tmp_path, 8, workers=0, seed=1)
    tr2, te2, _ = build_loaders("fashion-mnist", tmp_path, 8, workers=2, seed=1)
    for (x0, y0), (x2, y2) in zip(_first_batches(tr0, 4), _first_batches(tr2, 4), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert sum(len(y) for _, y in te2) == 8


def test_loader_drop_last_and_sharding():
    sampler = EpochSampler(10, seed=0, world_size=3, rank=1)
    assert len(sampler) == 4
    shards = []
    for rank in range(3):
        s = EpochSampler(10, seed=0, world_size=3, rank=rank)
        shards += [i for i, _ in s]
    assert sorted(set(shards)) == list(range(10)) and len(shards) == 12
    train, test, info = build_loaders("synthetic", None, 100, workers=0, num_train=250)
    assert len(train) == 2 and sum(len(y) for _, y in train) == 200  # drop_last
    assert info.image_size == 32 and len(test.dataset) == 512
    with pytest.raises(ValueError, match="batch_size"):
        build_loaders("synthetic", None, 300, workers=0, num_train=250)


def test_sampler_skip_resumes_mid_epoch_with_the_same_samples():
    """set_epoch(e, skip=k) yields exactly the tail of epoch e (order and augmentation seeds),
    then the following epoch starts from its beginning again."""
    full = list(EpochSampler(50, seed=3, world_size=2, rank=1).__iter__())
    s = EpochSampler(50, seed=3, world_size=2, rank=1)
    s.set_epoch(0, skip=7)
    assert list(s) == full[7:]
    ref = EpochSampler(50, seed=3, world_size=2, rank=1)
    ref.set_epoch(1)
    assert list(s) == list(ref)  # the epoch after the resumed one is whole
    with pytest.raises(ValueError, match="skip"):
        s.set_epoch(0, skip=-1)
    train, _, _ = build_loaders("synthetic", None, 8, workers=0, seed=5, num_train=64)
    train.sampler.set_epoch(2)
    batches = [y for _, y in train]
    train.sampler.set_epoch(2, skip=3 * 8)
    rest = [y for _, y in train]
    assert len(rest) == len(batches) - 3
    assert all(torch.equal(a, b) for a, b in zip(batches[3:], rest, strict=True))


def test_holdout_carves_a_validation_split_from_the_training_set():
    from s2h.data import build_dataset, build_loaders

    full = build_dataset("synthetic", "train", None, False, None)
    n = len(full)
    train, val, info = build_loaders("synthetic", None, 16, workers=0, holdout=40)
    assert len(train.sampler) == n - 40 and len(val.dataset) == 40
    xs = torch.cat([x for x, _ in val])
    ref = torch.stack([full[i][0] for i in range(n - 40, n)])
    assert torch.equal(xs, ref)  # the last 40 training images, unaugmented
    seen = [i for i, _ in train.sampler]
    assert len(seen) == n - 40 and max(seen) < n - 40  # never trained on
    assert train.dataset[(3, 7)][1] == full[(3, 7)][1]
    assert info.image_size == full.image_size
    with pytest.raises(ValueError, match="holdout"):
        build_loaders("synthetic", None, 16, workers=0, holdout=n)
