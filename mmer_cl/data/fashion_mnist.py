"""Fashion-MNIST from the Debian package dataset-fashion-mnist (gzipped idx files), offline.

Splits: the official test set (10000) is `test`; the official training set (60000) is split by the seed
into `train` (54000) and a class-stratified `val` (6000, 600 per class). x is float32 [1, 28, 28] in [0, 1]
(pixel / 255, not standardised); y in 0..9.
"""

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmer_cl.data.common import LabelledTensors, Splits, cache_dir, missing, publish_dir, stratified_indices

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SIZES = {"train": 60000, "test": 10000}


def source_dir(root: str | Path | None = None) -> Path:
    """The folder with the gzipped idx files: `root`, else $MMER_FASHION_MNIST_DIR, else the Debian one."""
    return Path(root or os.environ.get("MMER_FASHION_MNIST_DIR") or DEBIAN_DIR)


def _torchvision_raw() -> Path:
    # The layout torchvision's FashionMNIST (and so Avalanche's SplitFMNIST) reads: <root>/FashionMNIST/raw.
    return cache_dir() / "fashion_mnist" / "FashionMNIST" / "raw"


def read_idx(path: Path) -> np.ndarray:
    """An idx file, gzipped or not: bytes 0,0, type 0x08 (uint8), ndim; ndim big-endian int32 sizes; data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _files(root: str | Path | None, download: bool) -> dict[str, tuple[Path, Path]]:
    """The four idx files: the gzipped ones in source_dir(root); without an explicit root, else the unpacked
    copies in the cache (laid out by fashion_mnist_root or downloaded earlier); else a torchvision download
    when allowed; else a MissingDataError naming the Debian package."""
    candidates = [(source_dir(root), ".gz")] + ([] if root else [(_torchvision_raw(), "")])
    for folder, suffix in candidates:
        found = {split: tuple(folder / (name + suffix) for name in names) for split, names in FILES.items()}
        if all(p.is_file() for pair in found.values() for p in pair):
            return found
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(cache_dir() / "fashion_mnist", train=True, download=True)
        FashionMNIST(cache_dir() / "fashion_mnist", train=False, download=True)
        return {split: tuple(_torchvision_raw() / name for name in names) for split, names in FILES.items()}
    first = source_dir(root) / (FILES["train"][0] + ".gz")
    raise missing("Fashion-MNIST", first, "dataset-fashion-mnist",
                  "point MMER_FASHION_MNIST_DIR (or root=) at a folder with its four .gz idx files, "
                  "or pass download=True to fetch it with torchvision where there is network access")


def _read_split(images: Path, labels: Path, split: str) -> tuple[Tensor, Tensor]:
    x, y = read_idx(images), read_idx(labels)
    if x.shape != (SIZES[split], 28, 28) or y.shape != (SIZES[split],):
        raise ValueError(f"Fashion-MNIST {split}: {images} has shape {x.shape} and {labels} {y.shape}, "
                         f"expected ({SIZES[split]}, 28, 28) and ({SIZES[split]},)")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def to_unit(image: Tensor) -> Tensor:
    """uint8 [1, 28, 28] -> float32 in [0, 1]. Images stay bytes in memory (55 MB, not 220 MB)."""
    return image.float().div_(255.0)


def load_fashion_mnist(seed: int = 0, val_size: int = 6000, root: str | Path | None = None,
                       download: bool = False) -> Splits:
    """Fashion-MNIST splits: train / val from the official training set (val class-stratified, chosen by
    `seed`), test = the official test set. Each example carries `.index`, its row in its official file."""
    files = _files(root, download)
    train_x, train_y = _read_split(*files["train"], "train")
    test_x, test_y = _read_split(*files["test"], "test")
    val_index = stratified_indices(train_y, val_size, torch.Generator().manual_seed(seed))
    is_val = torch.zeros(len(train_y), dtype=torch.bool)
    is_val[val_index] = True
    train_index = torch.nonzero(~is_val).flatten()

    def split(x: Tensor, y: Tensor, index: Tensor) -> LabelledTensors:
        return LabelledTensors(x[index], y[index], to_unit, index=index)

    return Splits(train=split(train_x, train_y, train_index), val=split(train_x, train_y, val_index),
                  test=split(test_x, test_y, torch.arange(len(test_y))), classes=list(CLASSES),
                  info={"source": str(files["train"][0].parent), "x": "float32 [1, 28, 28] in [0, 1]"})


def fashion_mnist_root(root: str | Path | None = None, download: bool = False) -> Path:
    """A folder that torchvision's FashionMNIST and Avalanche's `SplitFMNIST(dataset_root=...)` read without
    a download: the idx files unpacked into <cache>/fashion_mnist/FashionMNIST/raw/ (about 55 MB, once)."""
    files = _files(root, download)
    raw = _torchvision_raw()
    if not all((raw / name).is_file() for names in FILES.values() for name in names):
        shutil.rmtree(raw, ignore_errors=True)

        def unpack(tmp: Path) -> None:
            for pair in files.values():
                for path in pair:
                    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as src, \
                            open(tmp / path.name.removesuffix(".gz"), "wb") as dst:
                        shutil.copyfileobj(src, dst)

        publish_dir(unpack, raw)
    return raw.parent.parent
