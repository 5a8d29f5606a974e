"""MNIST for the VAE, as LightningDataModules that keep each split as one tensor on the device.

MNIST is small (50,000 x 784 bytes), so the fastest loader is no loader: each
split is one tensor on the training device, an epoch is one `randperm` on that
device, and a batch is an index into it. No worker processes, no per-sample
Python, no PIL.

- `BinarizedMNIST`: the statically binarized MNIST of Larochelle & Murray (2011),
  50,000 / 10,000 / 10,000, read from `binarized_mnist_{split}.amat[.gz]` under
  `<root>/binarized_mnist/`, downloaded when missing.
- `DynamicMNIST`: torchvision's MNIST (60,000 / 10,000 grayscale), binarized with a
  fresh Bernoulli draw per batch; 10,000 validation images held out by a fixed seed.

The data root is `data.root`, else $DISCRETE_VAE_DATA, else ./data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from discrete_vae.errors import ConfigError, DataError

BINARIZED_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
SPLITS = {"train": "train", "val": "valid", "test": "test"}
NUM_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
NUM_PIXELS = 784
# SHA-256 of the canonical uncompressed .amat files, checked after a download.
AMAT_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """`root` if given, else $DISCRETE_VAE_DATA, else ./data."""
    return Path(root or os.environ.get("DISCRETE_VAE_DATA") or "data").expanduser().resolve()


class Batches:
    """Batches of rows of one tensor, shuffled by one `randperm` on the tensor's device per epoch.

    Works wherever Lightning takes a dataloader: it is iterable and has a length.
    """

    def __init__(self, data: Tensor, batch_size: int, shuffle: bool, binarize: bool = False):
        self.data, self.batch_size, self.shuffle, self.binarize = data, batch_size, shuffle, binarize

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, device=self.data.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            rows = self.data[start : start + self.batch_size] if order is None else self.data[order[start : start + self.batch_size]]
            rows = rows.float()
            yield torch.bernoulli(rows) if self.binarize else rows  # dynamic binarization, fresh per batch


# -- statically binarized MNIST ---------------------------------------------------------------
def _parse_amat(raw: bytes, path: Path, expected_rows: int) -> np.ndarray:
    """Bytes of an .amat file -> (rows, 784) uint8 of 0/1, with errors naming the problem."""
    lines = raw.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()
    if len(lines) != expected_rows:
        raise DataError(
            f"{path} has {len(lines)} lines, expected {expected_rows} (one image per line): the file is "
            f"truncated or is not the canonical binarized MNIST; delete it to download it again."
        )
    width = 2 * NUM_PIXELS  # "0 1 0 ... 1\n": one digit and one separator per pixel
    flat = np.frombuffer(raw, dtype=np.uint8)
    if len(raw) == width * expected_rows:
        grid = flat.reshape(expected_rows, width)
        pixels, separators = grid[:, 0::2], grid[:, 1::2]
        if np.all(separators[:, :-1] == ord(" ")) and np.all(separators[:, -1] == ord("\n")):
            if not np.all((pixels == ord("0")) | (pixels == ord("1"))):
                row = int(np.argwhere((pixels != ord("0")) & (pixels != ord("1")))[0, 0])
                raise DataError(f"{path}: line {row + 1} holds a value other than 0 or 1; the file is corrupt.")
            return pixels - ord("0")
    # General layout (other whitespace): parse line by line, still checking everything.
    out = np.empty((expected_rows, NUM_PIXELS), dtype=np.uint8)
    for i, line in enumerate(lines):
        values = line.split()
        if len(values) != NUM_PIXELS:
            raise DataError(f"{path}: line {i + 1} has {len(values)} values, expected {NUM_PIXELS}; the file is corrupt.")
        row = np.array(values, dtype=object)
        ok = (row == b"0") | (row == b"1")
        if not ok.all():
            raise DataError(f"{path}: line {i + 1} holds a value other than 0 or 1; the file is corrupt.")
        out[i] = row == b"1"
    return out


def _download(url: str, target: Path, sha256: str) -> None:
    """Download to a temporary file beside `target`, check it, and rename it only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        if digest != sha256:
            raise DataError(f"the file downloaded from {url} has SHA-256 {digest}, expected {sha256}; try again.")
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(
            f"could not download {url} to {target}: {err}. Without internet, put the files "
            f"binarized_mnist_{{train,valid,test}}.amat (or .amat.gz) in {target.parent} and point "
            f"data.root (or $DISCRETE_VAE_DATA) at its parent."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def binarized_mnist_path(root: Path, split: str, download: bool) -> Path:
    """The file of one split ('train', 'valid', 'test'), downloading it if allowed and missing."""
    folder = root / "binarized_mnist"
    name = f"binarized_mnist_{split}.amat"
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not download:
        raise DataError(
            f"missing {name} (or {name}.gz): looked in {folder}. Download is off (data.download=false). "
            f"Put the file there, set data.root=DIR or $DISCRETE_VAE_DATA=DIR to a folder holding "
            f"binarized_mnist/, or allow the download with data.download=true."
        )
    _download(BINARIZED_URL + name, folder / name, AMAT_SHA256[split])
    return folder / name


def load_binarized_mnist(root: Path, split: str, download: bool = True) -> Tensor:
    """One split as a (rows, 784) uint8 tensor of 0/1."""
    path = binarized_mnist_path(root, split, download)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path}: {err}. The file is corrupt; delete it and download it again.") from err
    return torch.from_numpy(_parse_amat(raw, path, NUM_ROWS[split]))


class _TensorDataModule(L.LightningDataModule):
    """Shared part: splits as uint8 tensors moved once to the trainer's device, served by `Batches`."""

    binarize_train = False

    def __init__(self, root: str | None = None, batch_size: int = 100, eval_batch_size: int = 1000, download: bool = True):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size and data.eval_batch_size must be positive, got {batch_size}, {eval_batch_size}")
        self.root = data_root(root)
        self.batch_size, self.eval_batch_size, self.download = batch_size, eval_batch_size, download
        self.splits: dict[str, Tensor] = {}

    def load(self) -> dict[str, Tensor]:  # pragma: no cover - per dataset
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.load_splits()

    def load_splits(self) -> dict[str, Tensor]:
        if not self.splits:
            self.splits = self.load()
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.splits = {name: t.to(device) for name, t in self.load_splits().items()}

    def train_dataloader(self):
        return Batches(self.splits["train"], self.batch_size, shuffle=True, binarize=self.binarize_train)

    def val_dataloader(self):
        return Batches(self.splits["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return Batches(self.splits["test"], self.eval_batch_size, shuffle=False)


class BinarizedMNIST(_TensorDataModule):
    """Statically binarized MNIST (Larochelle & Murray 2011), 50k / 10k / 10k."""

    def load(self) -> dict[str, Tensor]:
        return {name: load_binarized_mnist(self.root, split, self.download) for name, split in SPLITS.items()}


class DynamicMNIST(_TensorDataModule):
    """torchvision MNIST, dynamically binarized per training batch.

    The last `num_val` of a fixed permutation (seed `split_seed`) of the 60k training images
    are held out for validation. Validation and test images are binarized once with a fixed
    seed, so their numbers are comparable across epochs and runs.
    """

    binarize_train = True

    def __init__(self, *args, num_val: int = 10_000, split_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_val, self.split_seed = num_val, split_seed

    def load(self) -> dict[str, Tensor]:
        from torchvision.datasets import MNIST

        try:
            train = MNIST(str(self.root), train=True, download=self.download).data
            test = MNIST(str(self.root), train=False, download=self.download).data
        except RuntimeError as err:
            raise DataError(
                f"torchvision MNIST not found under {self.root / 'MNIST'} ({err}). Allow the download with "
                f"data.download=true or point data.root (or $DISCRETE_VAE_DATA) at a folder holding MNIST/raw."
            ) from err
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(train), generator=generator)
        gray = lambda t: (t.flatten(1).float() / 255.0)  # noqa: E731
        fixed = lambda t: torch.bernoulli(gray(t), generator=generator).to(torch.uint8)  # noqa: E731
        return {
            "train": (train[order[: -self.num_val]].flatten(1).float() / 255.0),
            "val": fixed(train[order[-self.num_val :]]),
            "test": fixed(test),
        }
