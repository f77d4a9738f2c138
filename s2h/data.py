"""Datasets and data loaders for the s2h experiments.

Nothing here downloads anything: every loader reads files that are already on disk and says
where it looked (and how to get the files) when they are missing.

Datasets (``DATASETS``):

- ``synthetic`` -- 3x32x32, 10 classes, generated deterministically from a seed: a smooth random
  pattern per class, randomly shifted and scaled, plus Gaussian noise. Learnable by a small CNN;
  meant for tests and smoke runs.
- ``fashion-mnist`` -- the idx files of Fashion-MNIST (1x28x28, 10 classes), as installed by the
  Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist/``
  (``train-images-idx3-ubyte.gz`` ... ``t10k-labels-idx1-ubyte.gz``; uncompressed files too).
- ``cifar100`` -- the "python version" of CIFAR-100 (``cifar-100-python/{train,test,meta}``, or the
  ``cifar-100-python.tar.gz`` archive itself), read with a restricted unpickler.
- ``imagefolder`` -- ImageNet-style folders ``root/train/<class>/**/*.JPEG`` and
  ``root/val/<class>/*`` (or Tiny ImageNet's ``val/images`` + ``val/val_annotations.txt``).

Every dataset item is ``(image, label)``: ``image`` a float32 tensor of shape ``(C, H, W)``,
normalised with the dataset's mean/std, ``label`` a python ``int``.

Reproducibility: the train loader of :func:`build_loaders` uses an :class:`EpochSampler`, whose
order *and* per-sample augmentation seeds are a pure function of ``(seed, epoch)``, independent
of the number of workers. Resuming at epoch ``e`` is ``loader.sampler.set_epoch(e)``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import math
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset, pil_loader
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "DATASETS",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "EpochSampler",
    "ImageFolderDataset",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_dataset",
    "build_loaders",
    "dataset_info",
    "random_crop_flip",
    "read_idx",
    "restricted_unpickle",
]

DATASETS = ("synthetic", "fashion-mnist", "cifar100", "imagefolder")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
# No distribution packages CIFAR-100; this is only where we look when no --data-dir is given.
CIFAR100_DIR = "/usr/share/datasets/cifar100"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
    "imagenet": "imagefolder",
    "tiny-imagenet": "imagefolder",
}

# Per-channel statistics of the training sets (pixel values in [0, 1]).
_FASHION_MNIST_MEAN = (0.2860,)
_FASHION_MNIST_STD = (0.3530,)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_SYNTHETIC_SIZES = {"train": 2048, "test": 512}


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where we looked; the message says where and how to fix."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is malformed (bad magic number, truncated, unsafe pickle, ...)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    ``default_dir`` is where the loader looks when no ``data_dir`` is given (``None`` when the
    dataset has no default location). ``mean``/``std`` are the per-channel normalisation
    statistics (pixel values in [0, 1]).
    """

    in_chans: int
    num_classes: int
    image_size: int
    default_dir: str | None
    name: str = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """Channels, classes, native image size and default folder of dataset ``name``.

    For ``imagefolder`` the classes are counted (and the image size detected) in
    ``data_dir/train``, so ``data_dir`` is required there.
    """
    key = _canonical_name(name)
    if key == "synthetic":
        return DatasetInfo(3, 10, 32, None, key, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if key == "fashion-mnist":
        return DatasetInfo(
            1, 10, 28, FASHION_MNIST_DIR, key, _FASHION_MNIST_MEAN, _FASHION_MNIST_STD
        )
    if key == "cifar100":
        return DatasetInfo(3, 100, 32, CIFAR100_DIR, key, _CIFAR100_MEAN, _CIFAR100_STD)
    if data_dir is None:
        raise ValueError(
            "dataset 'imagefolder' needs data_dir (the folder holding train/ and val/)"
        )
    files = _train_class_files(Path(data_dir))
    native = _native_small_size(next(iter(files.values()))[0])
    return DatasetInfo(3, len(files), native or 224, None, key, _IMAGENET_MEAN, _IMAGENET_STD)


# --------------------------------------------------------------------------------------------
# Seeds and augmentation
#
# The random parameters (crop offsets, flips, RandomResizedCrop boxes) are drawn here from the
# per-sample generator of the EpochSampler, not by torchvision's random transforms: those draw
# from the global generator (and RandomResizedCrop in another order), so the batches would
# depend on the number of workers and differ from the runs already recorded. The pixel work
# itself is torchvision's (crop with zero padding, flip, antialiased resize).
# --------------------------------------------------------------------------------------------


def _derive_seed(*values: int) -> int:
    """A 63-bit seed mixing ``values`` (independent streams for e.g. (seed, epoch))."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(state.generate_state(1, np.uint64)[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def _unpack_index(index: Any) -> tuple[int, torch.Generator | None]:
    """``index`` is an int, or ``(int, sample_seed)`` as yielded by :class:`EpochSampler`."""
    if isinstance(index, (tuple, list)):
        position, sample_seed = index
        return int(position), torch.Generator().manual_seed(int(sample_seed))
    return int(index), None


def random_crop_flip(
    image: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` px, crop back to the input size at a random offset, flip half the
    time. ``image``: float ``(C, H, W)``; returns a new float ``(C, H, W)`` tensor."""
    _, height, width = image.shape
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
        # a window of the zero-padded image: torchvision's crop pads what lies outside
        image = TF.crop(image, offsets[0] - padding, offsets[1] - padding, height, width)
    if float(torch.rand((), generator=generator)) < 0.5:
        image = TF.hflip(image)
    return image


def _subset_indices(total: int, num_samples: int | None) -> torch.Tensor | None:
    """Evenly spaced indices (covers every class even of a class-sorted set), or None = all."""
    if num_samples is None or num_samples >= total:
        return None
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return torch.linspace(0, total - 1, num_samples).round().long().unique()


# --------------------------------------------------------------------------------------------
# In-memory datasets (synthetic, Fashion-MNIST, CIFAR-100)
# --------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor.

    Args:
        images: uint8 ``(N, C, H, W)`` (pixel values 0..255) or float ``(N, C, H, W)``
            (already in the scale ``mean``/``std`` refer to).
        labels: int64 ``(N,)``.
        mean, std: per-channel normalisation, ``len == C``.
        augment: random crop (zero padding ``padding``) + horizontal flip.
        image_size: output side length; images are resized (bilinear) when it differs.

    Items: ``(float32 (C, image_size, image_size), int)``. The index may be an int or
    ``(int, sample_seed)``; with a seed the augmentation is deterministic.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        padding: int = 4,
        image_size: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be ({images.shape[0]},), got shape {tuple(labels.shape)}"
            )
        self.images = images
        self.targets = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = bool(augment)
        self.padding = int(padding)
        self.image_size = int(image_size or images.shape[-1])
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        position, generator = _unpack_index(index)
        image = self.images[position]
        image = image.float().div(255.0) if image.dtype == torch.uint8 else image.float()
        if self.augment:
            image = random_crop_flip(image, self.padding, generator)
        if image.shape[-2:] != (self.image_size, self.image_size):  # bilinear, antialiased
            image = TF.resize(image, [self.image_size] * 2, antialias=True)
        return (image - self.mean) / self.std, int(self.targets[position])


class SyntheticDataset(TensorImageDataset):
    """Deterministic, learnable synthetic images (3x32x32 by default, 10 classes).

    Each class owns a smooth random pattern (4x4 Gaussian noise upsampled bicubically, unit
    variance). A sample is its class pattern, scaled by a random factor in [0.6, 1.4] and
    circularly shifted by up to 3 px, plus N(0, ``noise_std``) pixel noise; the whole is scaled
    to unit variance. The patterns depend on ``seed`` only, so train and test share them; the
    samples come from independent streams per split. With the default ``noise_std`` the task
    is easy (a small CNN reaches ~100% test accuracy within a few epochs): it is meant for
    tests and smoke runs; raise ``noise_std`` (e.g. 4) for a harder task.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        seed: int = 0,
        num_classes: int = 10,
        image_size: int = 32,
        in_chans: int = 3,
        noise_std: float = 1.0,
        augment: bool = False,
    ) -> None:
        _check_split(split)
        n = int(num_samples if num_samples is not None else _SYNTHETIC_SIZES[split])
        if n <= 0:
            raise ValueError(f"num_samples must be positive, got {n}")
        g_patterns = torch.Generator().manual_seed(_derive_seed(seed, 0))
        coarse = torch.randn(num_classes, in_chans, 4, 4, generator=g_patterns)
        patterns = F.interpolate(
            coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
        )
        patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)

        g = torch.Generator().manual_seed(_derive_seed(seed, 1 if split == "train" else 2))
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        scale = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        shifts = torch.randint(-3, 4, (n, 2, 1), generator=g)
        # Per-sample circular shift (torch.roll semantics: out[i] = in[(i - shift) % size]).
        grid = torch.arange(image_size)
        rows = (grid - shifts[:, 0]) % image_size  # (n, S)
        cols = (grid - shifts[:, 1]) % image_size
        images = patterns[
            labels[:, None, None, None],
            torch.arange(in_chans)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
        images = images * scale + noise_std * torch.randn(images.shape, generator=g)
        # E[scale^2] = 0.6^2 + 0.6*0.8 + 0.8^2/3; dividing by the total std gives unit variance.
        images /= math.sqrt(0.36 + 0.48 + 0.64 / 3 + noise_std**2)
        super().__init__(
            images,
            labels,
            (0.0,) * in_chans,
            (1.0,) * in_chans,
            augment=augment,
            padding=4,
            image_size=image_size,
            classes=[f"class_{k}" for k in range(num_classes)],
        )


# ---- idx (Fashion-MNIST) -------------------------------------------------------------------
# Not torchvision's reader (datasets.mnist.read_sn3_pascalvincent_tensor): it opens
# uncompressed files only (the Debian package installs .gz), checks the header with assert
# statements (gone under python -O) and does not name the file or what is wrong in it.

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not.

    Header: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the data follows, big-endian, C order. Returns a native-endian, writable array of
    those dimensions. Raises :class:`DatasetFormatError` naming ``path`` on any inconsistency.
    """
    path = Path(path)
    return _read_idx_cached(str(path), *_file_key(path)).copy()


def _file_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path_str: str, mtime_ns: int, size: int) -> np.ndarray:
    # Keyed on (mtime, size) so a rewritten file is re-read. Callers must not modify the result.
    del mtime_ns, size
    path = Path(path_str)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetFormatError(
            f"{path}: not an idx file (bad magic number 0x{raw[:4].hex() or 'empty'})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: truncated or oversized idx file: header says shape {dims} "
            f"({expected} data bytes), file holds {len(raw) - header}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find_fashion_mnist_file(directory: Path, stem: str) -> Path:
    """``stem.gz`` or ``stem`` in ``directory`` (or torchvision's ``FashionMNIST/raw``)."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    state = "does not exist" if not directory.is_dir() else f"has no {stem}.gz (nor {stem})"
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: directory {directory} {state}. "
        f"Install it with `{FASHION_MNIST_INSTALL}` (Debian package, files go to "
        f"{FASHION_MNIST_DIR}/), or pass --data-dir / data_dir= pointing to a folder holding "
        f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        f"and t10k-labels-idx1-ubyte.gz."
    )


def _load_fashion_mnist(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)``."""
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    image_path = _find_fashion_mnist_file(directory, image_stem)
    label_path = _find_fashion_mnist_file(directory, label_stem)
    images = _read_idx_cached(str(image_path), *_file_key(image_path))
    labels = _read_idx_cached(str(label_path), *_file_key(label_path))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{image_path}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetFormatError(
            f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(
            f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images in {image_path}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DatasetFormatError(f"{label_path}: label {int(labels.max())} out of range 0..9")
    # The cached arrays are shared and never written to; torch.from_numpy does not copy.
    image_tensor = torch.from_numpy(images).unsqueeze(1)
    return image_tensor, torch.from_numpy(labels.astype(np.int64))


# ---- CIFAR-100 (python pickles, restricted unpickling) -------------------------------------


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


@functools.lru_cache(maxsize=1)
def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core: accept both, same objects.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers/str/bytes/numbers and numpy arrays/dtypes/scalars.

    Every global a pickle names goes through ``find_class``; anything other than numpy's
    array-reconstruction helpers is refused, so no pickle can call e.g. ``os.system``.
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_pickle_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays and plain "
                "python containers are allowed in dataset pickles"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in dataset pickles")


def restricted_unpickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing no globals except numpy array reconstruction.

    Python-2 pickles (the original CIFAR files) are decoded with ``encoding="latin1"``, which
    numpy documents as the right choice for arrays. Raises :class:`DatasetFormatError` naming
    ``source`` on a refused global or malformed data.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # malformed pickles raise many types; all mean "bad file"
        raise DatasetFormatError(f"{source}: cannot unpickle safely: {exc}") from exc


def _read_cifar_member(directory: Path, member: str, required: bool = True) -> tuple[Any, str]:
    """Unpickled ``cifar-100-python/<member>`` from a folder or from the .tar.gz archive."""
    for candidate in (directory / "cifar-100-python" / member, directory / member):
        if candidate.is_file():
            return restricted_unpickle(candidate.read_bytes(), str(candidate)), str(candidate)
    archive = directory / "cifar-100-python.tar.gz"
    if archive.is_file():
        source = f"{archive}:cifar-100-python/{member}"
        try:
            with tarfile.open(archive, "r:*") as tar:
                handle = tar.extractfile(f"cifar-100-python/{member}")
                data = handle.read() if handle is not None else None
        except KeyError:
            data = None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetFormatError(f"{archive}: corrupt archive ({exc})") from exc
        if data is not None:
            return restricted_unpickle(data, source), source
    if not required:
        return None, ""
    state = "does not exist" if not directory.is_dir() else f"has no cifar-100-python/{member}"
    raise DatasetNotFoundError(
        f"CIFAR-100 not found: directory {directory} {state} (nor cifar-100-python.tar.gz). "
        f"Nothing is downloaded at run time: fetch {CIFAR100_URL} by hand, put the archive or "
        f"its extracted cifar-100-python/ folder in {CIFAR100_DIR} or pass --data-dir."
    )


def _plain_keys(obj: Any, source: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _load_cifar100(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images ``(N, 3, 32, 32)``, int64 labels ``(N,)`` and the 100 class names."""
    obj, source = _read_cifar_member(directory, split)
    entry = _plain_keys(obj, source)
    if "data" not in entry or "fine_labels" not in entry:
        raise DatasetFormatError(
            f"{source}: missing 'data' or 'fine_labels' (keys: {sorted(entry)})"
        )
    data = entry["data"]
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.size % 3072 != 0:
        raise DatasetFormatError(
            f"{source}: 'data' must be uint8 with 3072 values per image, "
            f"got {data.dtype} {data.shape}"
        )
    images = data.reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024), each row-major
    labels = np.asarray(entry["fine_labels"], dtype=np.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(f"{source}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= 100):
        raise DatasetFormatError(f"{source}: fine label out of range 0..99")
    classes = [str(k) for k in range(100)]
    meta, meta_source = _read_cifar_member(directory, "meta", required=False)
    if meta is not None:
        names = _plain_keys(meta, meta_source).get("fine_label_names")
        if isinstance(names, list) and len(names) == 100:
            classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    image_tensor = torch.from_numpy(np.ascontiguousarray(images).copy())
    return image_tensor, torch.from_numpy(labels), classes


# --------------------------------------------------------------------------------------------
# Image folders (ImageNet / Tiny ImageNet layout), PIL based
# --------------------------------------------------------------------------------------------


def _class_files(folder: Path, names: Sequence[str]) -> dict[str, list[Path]]:
    """The image files anywhere under ``folder/<name>/`` of each name (Tiny ImageNet nests them
    in images/), found by torchvision's ``make_dataset`` (its extensions, sorted walk)."""
    found: dict[str, list[Path]] = {name: [] for name in names}
    if names:
        index = {name: k for k, name in enumerate(names)}
        for path, k in make_dataset(str(folder), index, IMG_EXTENSIONS, allow_empty=True):
            found[names[k]].append(Path(path))
    return found


def _train_class_files(root: Path) -> dict[str, list[Path]]:
    """``{class: image files}`` of ``root/train``, classes sorted, folders without images left
    out."""
    train = root / "train"
    if not train.is_dir():
        raise DatasetNotFoundError(
            f"image folder not found: {train} does not exist (expected {root}/train/<class>/"
            f"*.JPEG and {root}/val/...); pass --data-dir pointing to the dataset root"
        )
    names = sorted(d.name for d in train.iterdir() if d.is_dir())
    files = {name: paths for name, paths in _class_files(train, names).items() if paths}
    if not files:
        raise DatasetNotFoundError(f"image folder {train} has no class folder holding images")
    return files


def _native_small_size(path: Path) -> int | None:
    """The side of a square image of at most 64 px (Tiny ImageNet: 64), else None."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return width if width == height and width <= 64 else None


def _scan_imagefolder(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    train_files = _train_class_files(root)
    classes = list(train_files)
    class_to_idx = {name: k for k, name in enumerate(classes)}
    if split == "train":
        samples = [(p, class_to_idx[name]) for name, paths in train_files.items() for p in paths]
        return samples, classes
    val = root / "val"
    annotations = val / "val_annotations.txt"
    if annotations.is_file() and (val / "images").is_dir():  # Tiny ImageNet
        samples = []
        for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in class_to_idx:
                raise DatasetFormatError(
                    f"{annotations}:{line_no}: expected '<file>\\t<class in train/>...', "
                    f"got {line!r}"
                )
            path = val / "images" / fields[0]
            if not path.is_file():
                raise DatasetNotFoundError(f"{annotations}:{line_no}: {path} does not exist")
            samples.append((path, class_to_idx[fields[1]]))
    else:
        folder = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if folder is None:
            raise DatasetNotFoundError(
                f"image folder test split not found: {val} does not exist "
                f"(expected {val}/<class>/* or {val}/images + {annotations.name})"
            )
        samples = []
        names = sorted(d.name for d in folder.iterdir() if d.is_dir())
        for name, files in _class_files(folder, names).items():
            if files and name not in class_to_idx:
                raise DatasetFormatError(
                    f"{folder / name}: class {name!r} has no folder in {root / 'train'}"
                )
            samples.extend((p, class_to_idx[name]) for p in files)
        val = folder
    if not samples:
        raise DatasetNotFoundError(f"image folder {val} holds no images")
    return samples, classes


class ImageFolderDataset(Dataset):
    """ImageNet-style folders, decoded with PIL.

    Train (``augment=True``): random resized crop (area ``scale``, aspect ``ratio``, as
    torchvision's ``RandomResizedCrop``) to ``image_size`` + horizontal flip. Test: resize the
    shorter side to ``round(image_size / crop_ratio)``, then center crop ``image_size``.
    Items: ``(float32 (3, image_size, image_size), int)``, ImageNet mean/std normalised.
    ``image_size`` defaults to the native side of small square images (Tiny ImageNet: 64, no
    crop margin at test) and to 224 (crop ratio 0.875) otherwise. Files are found and decoded
    by torchvision (``make_dataset``, ``pil_loader``); the resizing is PIL's own: the random
    box is resized in one call (``resize(box=...)``, filtering with the pixels around the box)
    and the test side is rounded, where torchvision's ``resized_crop`` (crop, then resize) and
    ``resize`` (truncates the side) give other pixels than the runs already recorded.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        augment: bool | None = None,
        image_size: int | None = None,
        crop_ratio: float | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        _check_split(split)
        self.root = Path(root)
        self.samples, self.classes = _scan_imagefolder(self.root, split)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        native = _native_small_size(self.samples[0][0])
        self.image_size = int(image_size or native or 224)
        if crop_ratio is None:
            crop_ratio = 1.0 if native is not None and self.image_size == native else 0.875
        self.crop_ratio = float(crop_ratio)
        self.augment = split == "train" if augment is None else bool(augment)
        self.scale = scale
        self.ratio = ratio
        self.mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def verify(self) -> None:
        """Open every image (PIL's header + integrity check, no full decode) and raise
        :class:`DatasetFormatError` naming the first file that is not a readable image, so a
        bad file stops a run before training instead of in the middle of it."""
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
                raise DatasetFormatError(f"{path}: not a readable image ({exc})") from exc

    def _crop_box(
        self, width: int, height: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop, torchvision's RandomResizedCrop rule."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(2, generator=generator).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return left, top, left + w, top + h
        # Fallback: the largest centered crop with an aspect ratio inside ``ratio``.
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        from PIL import Image

        position, generator = _unpack_index(index)
        path, label = self.samples[position]
        size = self.image_size
        bilinear = Image.Resampling.BILINEAR
        try:
            image = pil_loader(str(path))
        except OSError as exc:
            raise DatasetFormatError(f"{path}: cannot decode image ({exc})") from exc
        width, height = image.size
        if self.augment:
            image = image.resize(
                (size, size), bilinear, box=self._crop_box(width, height, generator)
            )
            if float(torch.rand((), generator=generator)) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            short = round(size / self.crop_ratio)
            factor = short / min(width, height)
            new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), bilinear)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return (tensor.float().div(255.0) - self.mean) / self.std, label


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------


def build_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    augment: bool | None = None,
    image_size: int | None = None,
    *,
    num_samples: int | None = None,
    data_seed: int = 0,
) -> Dataset:
    """Build one split of a dataset.

    Args:
        name: one of ``DATASETS`` (a few aliases such as ``fashion_mnist`` are accepted).
        split: ``"train"`` or ``"test"`` (the test split of ``imagefolder`` is ``val/``).
        data_dir: folder holding the files; ``None`` = the dataset's ``default_dir``.
        augment: ``None`` = on for the train split of the real datasets, off otherwise
            (synthetic data is never augmented by default).
        image_size: output side length; ``None`` = native (imagefolder: see
            :class:`ImageFolderDataset`).
        num_samples: synthetic: the number of samples (default 2048 train / 512 test); real
            datasets: keep this many evenly spaced samples (quick runs).
        data_seed: synthetic only: the seed that generates the data.

    Returns a map-style dataset of ``(float32 (C, H, W), int)`` items.
    """
    key = _canonical_name(name)
    _check_split(split)
    info = dataset_info(key, data_dir) if key != "imagefolder" else None
    if key == "synthetic":
        return SyntheticDataset(
            split,
            num_samples,
            seed=data_seed,
            image_size=int(image_size or 32),
            augment=bool(augment),
        )
    if augment is None:
        augment = split == "train"
    if key == "imagefolder":
        if data_dir is None:
            raise ValueError("dataset 'imagefolder' needs data_dir (the folder with train/, val/)")
        dataset: Dataset = ImageFolderDataset(
            data_dir, split, augment=augment, image_size=image_size
        )
        keep = _subset_indices(len(dataset), num_samples)
        if keep is not None:
            dataset.samples = [dataset.samples[i] for i in keep.tolist()]
            dataset.targets = dataset.targets[keep]
        return dataset
    assert info is not None
    directory = Path(data_dir if data_dir is not None else info.default_dir)
    if key == "fashion-mnist":
        images, labels = _load_fashion_mnist(directory, split)
        classes: Sequence[str] = FASHION_MNIST_CLASSES
        padding = 2
    else:
        images, labels, classes = _load_cifar100(directory, split)
        padding = 4
    keep = _subset_indices(images.shape[0], num_samples)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return TensorImageDataset(
        images,
        labels,
        info.mean,
        info.std,
        augment=augment,
        padding=padding,
        image_size=image_size,
        classes=classes,
    )


class EpochSampler(Sampler):
    """Seeded shuffling sampler whose output is a pure function of ``(seed, epoch)``.

    Yields ``(index, sample_seed)`` pairs: the datasets of this module seed each sample's
    augmentation with ``sample_seed``, so a run is reproducible whatever the number of
    workers. Each new iteration advances the epoch by one; ``set_epoch(e)`` (e.g. when
    resuming) sets the epoch the next iteration uses. With ``world_size > 1`` the permutation
    is padded to a multiple of ``world_size`` and rank ``r`` takes positions ``r::world_size``
    (as ``DistributedSampler``).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration produces epoch ``epoch``, starting after its first ``skip``
        samples of this rank (resuming mid-epoch without loading the skipped images).
        The skipped samples keep their places: the rest of the epoch is identical."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch = int(epoch)
        self.skip = int(skip)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.epoch += 1
        self.skip = 0  # only the resumed epoch starts late
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch))
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        total = len(self) * self.world_size
        if total > n:
            order = torch.cat([order, order[: total - n]])
        sample_seeds = torch.randint(0, 2**62, (total,), generator=generator)
        mine = slice(self.rank, total, self.world_size)
        pairs = list(zip(order[mine].tolist(), sample_seeds[mine].tolist(), strict=True))
        yield from pairs[skip:]


class _Slice(Dataset):
    """Samples ``start .. stop - 1`` of ``dataset``, re-indexed from 0; an index may be the
    ``(index, sample_seed)`` pair the :class:`EpochSampler` yields."""

    def __init__(self, dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.dataset[(idx[0] + self.start, *idx[1:])]
        return self.dataset[idx + self.start]


def build_loaders(
    name: str,
    data_dir: str | Path | None = None,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    *,
    test_batch_size: int | None = None,
    augment: bool | None = None,
    image_size: int | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    data_seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    holdout: int = 0,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Train and test loaders plus the dataset's :class:`DatasetInfo`.

    ``holdout > 0``: a validation split carved from the training set replaces the test set:
    the last ``holdout`` training images (without augmentation) are the second loader, and the
    train loader never sees them (for choosing hyper-parameters without the test set).

    The train loader shuffles with an :class:`EpochSampler` seeded by ``seed`` (``drop_last``);
    ``train_loader.sampler.set_epoch(e)`` before iterating reproduces epoch ``e`` exactly,
    augmentation included. The test loader is sequential and never dropped or sharded.
    Batches: images float32 ``(B, C, H, W)``, labels int64 ``(B,)``. ``info.image_size`` is
    the size the loaders produce.
    """
    key = _canonical_name(name)
    train_set = build_dataset(
        key, "train", data_dir, augment, image_size, num_samples=num_train, data_seed=data_seed
    )
    test_set = build_dataset(
        key, "test", data_dir, False, image_size, num_samples=num_test, data_seed=data_seed
    )
    full_train = train_set
    if holdout:
        n = len(train_set)
        if not 0 < holdout < n:
            raise ValueError(f"holdout must be in (0, {n}) training samples, got {holdout}")
        val_set = build_dataset(key, "train", data_dir, False, image_size, num_samples=num_train,
                                data_seed=data_seed)
        test_set = _Slice(val_set, n - holdout, n)
        train_set = _Slice(train_set, 0, n - holdout)
    sampler = EpochSampler(len(train_set), seed, rank=rank, world_size=world_size)
    if len(sampler) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(sampler)} training samples per "
            f"rank of {key!r}: the train loader (drop_last=True) would yield no batch"
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    test_loader = DataLoader(
        test_set, batch_size=test_batch_size or batch_size, shuffle=False, **common
    )
    if key == "imagefolder":
        info = DatasetInfo(3, len(full_train.classes), 0, None, key, _IMAGENET_MEAN,
                           _IMAGENET_STD)
    else:
        info = dataset_info(key, data_dir)
    info = dataclasses.replace(info, image_size=int(full_train.image_size))
    return train_loader, test_loader, info
