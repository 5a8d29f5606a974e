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
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from discrete_vae.errors import DataError, require_number
from discrete_vae.sampling import derive_seed

BINARIZED_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
SPLITS = {"train": "train", "val": "valid", "test": "test"}
NUM_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
NUM_PIXELS = 784
MAX_AMAT_BYTES = {split: 2 * NUM_PIXELS * rows + 4096 for split, rows in NUM_ROWS.items()}  # the text, and a margin
DOWNLOAD_DEADLINE_S = 600  # a whole download, however slowly the bytes come
# SHA-256 of the canonical uncompressed .amat files, checked after a download.
AMAT_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """`root` if given, else $DISCRETE_VAE_DATA, else ./data; a DataError when it is a file."""
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise DataError(f"data.root must be a folder's path, got {root!r}")
    path = Path(root or os.environ.get("DISCRETE_VAE_DATA") or "data").expanduser().resolve()
    if path.exists() and not path.is_dir():
        source = "data.root" if root else ("$DISCRETE_VAE_DATA" if os.environ.get("DISCRETE_VAE_DATA") else "./data")
        raise DataError(f"{source} is {path}, a file: point it at the folder that holds binarized_mnist/")
    return path


class Batches:
    """Batches of rows of one tensor; a shuffled epoch is one `randperm` on the tensor's device.

    Works wherever Lightning takes a dataloader: it is iterable and has a length. Training
    batches are resumable mid-epoch through Lightning's stateful-dataloader protocol
    (`state_dict` / `load_state_dict`): epoch e's order is `randperm` under a generator seeded
    from (seed, e), not the global RNG stream, so the state is just (epoch, batches consumed).

    Lightning pre-fetches one batch ahead of the step and may end an epoch early
    (limit_train_batches), so the position is not counted where batches are produced: the
    datamodule calls `advance(epoch_length)` when a batch reaches the step. Iterated without
    a trainer (no `advance`), each full pass is the next epoch.

    `epoch_clock` (the datamodule passes the trainer's current epoch) names the epoch an
    iteration from an epoch's start serves: Lightning restores the position from a checkpoint
    taken inside an epoch (last.ckpt), but not from one taken at its end (ModelCheckpoint's
    default, on_train_epoch_end), after which the resumed run would replay epoch 0's order.

    Under DDP rank r of `world_size` takes the r-th contiguous share of the one shared
    permutation (of the rows in order, for evaluation): disjoint shares that together cover
    the epoch (when the rows do not divide evenly the last few are left out, so every rank
    runs the same number of steps).
    """

    def __init__(
        self, data: Tensor, batch_size: int, shuffle: bool, binarize: bool = False,
        seed: int = 0, rank: int = 0, world_size: int = 1, epoch_clock: Callable[[], int] | None = None,
    ):
        self.data, self.batch_size, self.shuffle, self.binarize = data, batch_size, shuffle, binarize
        self.seed, self.rank, self.world_size, self.epoch_clock = seed, rank, world_size, epoch_clock
        self.epoch, self.consumed = 0, 0  # the epoch in progress, batches of it consumed
        self._tracked = False  # whether a trainer reports consumption through `advance`

    def _rows(self) -> int:
        """Rows of this rank's share of an epoch."""
        return len(self.data) // self.world_size

    def __len__(self) -> int:
        return -(-self._rows() // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def advance(self, epoch_length: int | float) -> None:
        """One more batch reached the training step; the epoch ends after `epoch_length` of them."""
        self._tracked = True
        self.consumed += 1
        if self.consumed >= min(epoch_length, len(self)):
            self.epoch, self.consumed = self.epoch + 1, 0

    def __iter__(self):
        if self.epoch_clock is not None and self.consumed == 0:
            self.epoch = self.epoch_clock()
        yield from self._batches(self.epoch, self.consumed)  # read when iteration begins
        if not self._tracked:
            self.epoch += 1

    def _batches(self, epoch: int, skip: int):
        device = self.data.device
        share = self._rows()
        first = self.rank * share  # this rank's rows: [first, first + share) of the (permuted) split
        order = None
        if self.shuffle:
            generator = torch.Generator(device).manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(len(self.data), device=device, generator=generator)[first : first + share]
        for i in range(skip, len(self)):
            start, end = i * self.batch_size, min((i + 1) * self.batch_size, share)
            rows = self.data[first + start : first + end] if order is None else self.data[order[start:end]]  # (B, D)
            batch = rows.float()
            if self.binarize:  # dynamic binarization, fresh per batch, replayable per (epoch, batch)
                generator = torch.Generator(device).manual_seed(derive_seed(self.seed, epoch, i, self.rank))
                batch = torch.bernoulli(batch, generator=generator)
            yield batch


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


def _copy_bounded(response, out, max_bytes: int, url: str) -> None:
    """Copy a download, refusing more than `max_bytes` or a transfer longer than DOWNLOAD_DEADLINE_S."""
    start, total = time.monotonic(), 0
    while chunk := response.read(1 << 20):
        total += len(chunk)
        if total > max_bytes:
            raise DataError(f"the file at {url} is larger than the canonical one ({max_bytes:,} bytes): refused")
        if time.monotonic() - start > DOWNLOAD_DEADLINE_S:
            raise DataError(f"downloading {url} took over {DOWNLOAD_DEADLINE_S} s: stopped; try again, or put the "
                            f"file in place by hand")
        out.write(chunk)


def _download(url: str, target: Path, sha256: str, max_bytes: int) -> None:
    """Download to a temporary file beside `target`, check it, and rename it only when complete;
    the temporary `.part` file is removed whatever happens."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    complete = False
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            _copy_bounded(response, out, max_bytes, url)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        if digest != sha256:
            raise DataError(f"the file downloaded from {url} has SHA-256 {digest}, expected {sha256}; try again.")
        os.replace(tmp, target)
        complete = True
    except OSError as err:
        raise DataError(
            f"could not download {url} to {target}: {err}. Without internet, put the files "
            f"binarized_mnist_{{train,valid,test}}.amat (or .amat.gz) in {target.parent} and point "
            f"data.root (or $DISCRETE_VAE_DATA) at its parent."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not complete:  # leave no empty folders behind a failed download
            for folder in created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break


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
    _download(BINARIZED_URL + name, folder / name, AMAT_SHA256[split], MAX_AMAT_BYTES[split])
    return folder / name


def load_binarized_mnist(root: Path, split: str, download: bool = True) -> Tensor:
    """One split as a (rows, 784) uint8 tensor of 0/1."""
    path = binarized_mnist_path(root, split, download)
    limit = MAX_AMAT_BYTES[split]
    try:
        # read at most the size the file must have (plus one byte to tell): a small .gz can inflate to GBs
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            raw = f.read(limit + 1)
    except PermissionError:
        raise DataError(f"{path} is not readable (permission denied): give this user read access to it") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {path}: {err}. The file is corrupt; delete it and download it again.") from None
    if len(raw) > limit:
        raise DataError(f"{path} holds more than the {NUM_ROWS[split]:,} images of the canonical file "
                        f"({limit:,} bytes at most): it is not the binarized MNIST; delete it to download it again.")
    return torch.from_numpy(_parse_amat(raw, path, NUM_ROWS[split]))


class _TensorDataModule(L.LightningDataModule):
    """Shared part: splits as uint8 tensors moved once to the trainer's device, served by `Batches`.

    `seed` fixes the data order of every epoch (scripts/train.py passes the run's seed).
    """

    binarize_train = False

    def __init__(
        self, root: str | None = None, batch_size: int = 100, eval_batch_size: int = 1000,
        download: bool = True, seed: int = 0,
    ):
        super().__init__()
        require_number("data.batch_size", batch_size, positive=True, integer=True)
        require_number("data.eval_batch_size", eval_batch_size, positive=True, integer=True)
        require_number("seed", seed, integer=True)
        if not isinstance(download, bool):
            raise DataError(f"data.download must be true or false, got {download!r}")
        self.root = data_root(root)
        self.batch_size, self.eval_batch_size, self.download, self.seed = batch_size, eval_batch_size, download, seed
        self.splits: dict[str, Tensor] = {}
        self._train_batches: Batches | None = None

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

    def train_images(self) -> Tensor:
        """The whole training split (every rank the same), e.g. for its mean image.  # (rows, D)"""
        return self.load_splits()["train"]

    def _shard(self) -> dict:
        """This process's rank and the world size (DDP), from the trainer."""
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self):
        self._train_batches = Batches(
            self.splits["train"], self.batch_size, shuffle=True, binarize=self.binarize_train,
            seed=self.seed, epoch_clock=self._current_epoch if self.trainer is not None else None, **self._shard(),
        )
        return self._train_batches

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch

    def val_dataloader(self):
        return Batches(self.splits["val"], self.eval_batch_size, shuffle=False, **self._shard())

    def test_dataloader(self):
        return Batches(self.splits["test"], self.eval_batch_size, shuffle=False, **self._shard())

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        if self._train_batches is not None and self.trainer is not None and self.trainer.training:
            self._train_batches.advance(self.trainer.num_training_batches)  # a batch reached the step
        return batch


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
    dataset = "MNIST"  # the torchvision class, and the folder under data.root that holds it

    def __init__(self, *args, num_val: int = 10_000, split_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        require_number("data.num_val", num_val, positive=True, integer=True, high=59_999)
        require_number("data.split_seed", split_seed, integer=True, low=0)
        self.num_val, self.split_seed = num_val, split_seed

    def load(self) -> dict[str, Tensor]:
        import torchvision.datasets

        source = getattr(torchvision.datasets, self.dataset)
        try:
            train = source(str(self.root), train=True, download=self.download).data
            test = source(str(self.root), train=False, download=self.download).data
        except RuntimeError as err:
            raise DataError(
                f"torchvision {self.dataset} not found under {self.root / self.dataset} ({err}). Allow the download "
                f"with data.download=true or point data.root (or $DISCRETE_VAE_DATA) at a folder holding "
                f"{self.dataset}/raw."
            ) from err
        if self.num_val >= len(train):
            raise DataError(f"data.num_val={self.num_val} leaves no training images of the {len(train)}; lower it")
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(train), generator=generator)
        gray = lambda t: (t.flatten(1).float() / 255.0)  # noqa: E731
        fixed = lambda t: torch.bernoulli(gray(t), generator=generator).to(torch.uint8)  # noqa: E731
        return {
            "train": (train[order[: -self.num_val]].flatten(1).float() / 255.0),
            "val": fixed(train[order[-self.num_val :]]),
            "test": fixed(test),
        }


class DynamicFashionMNIST(DynamicMNIST):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) through torchvision, 60k / 10k grey-level images
    of clothes, dynamically binarized as `DynamicMNIST` (the DisARM experiments' `fashion_mnist`);
    downloaded on first use into <root>/FashionMNIST/raw."""

    dataset = "FashionMNIST"
