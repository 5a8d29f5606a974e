"""MNIST for the VAE, as LightningDataModules that keep each split as one tensor on the device.

MNIST is small (50,000 x 784 bytes), so the fastest loader is no loader: each
split is one tensor on the training device, an epoch is one `randperm` on that
device, and a batch is an index into it. No worker processes, no per-sample
Python, no PIL.

- `BinarizedMNIST`: the statically binarized MNIST of Larochelle & Murray (2011),
  50,000 / 10,000 / 10,000, read from `binarized_mnist_{split}.amat[.gz]` under
  `<root>/binarized_mnist/`, downloaded when missing.
- `DynamicMNIST`: MNIST (60,000 / 10,000 grayscale) from torchvision's raw IDX files
  (`<root>/MNIST/raw/*-images-idx3-ubyte[.gz]`, read here, never torchvision's pickled
  `processed/*.pt`), binarized with a fresh Bernoulli draw per batch; 10,000 validation
  images held out by a fixed seed. `DynamicFashionMNIST` likewise.

The data root is `data.root`, else $DISCRETE_VAE_DATA, else ./data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import time
import urllib.request
import zlib
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
# the text (with room for Windows' "\r\n" line ends), and a margin
MAX_AMAT_BYTES = {split: (2 * NUM_PIXELS + 1) * rows + 4096 for split, rows in NUM_ROWS.items()}
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


def _require_readable(folder: Path) -> None:
    """A DataError naming `folder` when it exists but cannot be listed (mode 000, another user's):
    otherwise the first look inside it fails with a PermissionError naming some file below it,
    or (with `os.path.exists`) reports files that are there as missing."""
    try:
        with os.scandir(folder):
            pass
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there: the caller reports what is missing, or downloads it
    except PermissionError:
        raise DataError(f"{folder} cannot be read (permission denied): give this user read access to it "
                        f"(chmod u+rx), or point data.root (or $DISCRETE_VAE_DATA) at another folder") from None


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
        """The position a checkpoint saved; one this loader cannot have reached (past the end of
        an epoch, negative, not a whole number) is refused: resuming from it would skip data."""
        state = state if isinstance(state, dict) else {}
        epoch, consumed = state.get("epoch"), state.get("consumed")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, consumed))
        if not ok or consumed > len(self):
            raise DataError(f"the checkpoint's data position (epoch {epoch!r}, batch {consumed!r}) is not one an "
                            f"epoch of {len(self)} batches can reach: the checkpoint was edited or belongs to "
                            f"other data; resume from another checkpoint, or start afresh (resume=never)")
        self.epoch, self.consumed = epoch, consumed

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
    raw = raw.replace(b"\r\n", b"\n")  # a copy saved on Windows: same rows, and the fast path still applies
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


def _download(url: str, target: Path, digest: str, max_bytes: int, offline_fix: str, algorithm: str = "sha256") -> None:
    """Download to a temporary file beside `target`, check its `algorithm` digest, and rename it only
    when complete; the temporary `.part` file is removed whatever happens. `offline_fix` ends the
    message of a failed download: which files to put where by hand."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    complete = False
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            _copy_bounded(response, out, max_bytes, url)
        got = hashlib.new(algorithm, Path(tmp).read_bytes()).hexdigest()
        if got != digest:
            name = {"sha256": "SHA-256", "md5": "MD5"}.get(algorithm, algorithm)
            raise DataError(f"the file downloaded from {url} has {name} {got}, expected {digest}; try again.")
        os.replace(tmp, target)
        complete = True
    except OSError as err:
        raise DataError(f"could not download {url} to {target}: {err}. Without internet, {offline_fix}") from err
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
    _require_readable(root)
    _require_readable(folder)
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not download:
        raise DataError(
            f"missing {name} (or {name}.gz): looked in {folder}. Download is off (data.download=false). "
            f"Put the file there, set data.root=DIR or $DISCRETE_VAE_DATA=DIR to a folder holding "
            f"binarized_mnist/, or allow the download with data.download=true."
        )
    offline_fix = (f"put the files binarized_mnist_{{train,valid,test}}.amat (or .amat.gz) in {folder} and point "
                   f"data.root (or $DISCRETE_VAE_DATA) at its parent.")
    _download(BINARIZED_URL + name, folder / name, AMAT_SHA256[split], MAX_AMAT_BYTES[split], offline_fix)
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
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}. The file is corrupt; delete it and download it again.") from None
    if len(raw) > limit:
        raise DataError(f"{path} holds more than the {NUM_ROWS[split]:,} images of the canonical file "
                        f"({limit:,} bytes at most): it is not the binarized MNIST; delete it to download it again.")
    return torch.from_numpy(_parse_amat(raw, path, NUM_ROWS[split]))


# -- MNIST and Fashion-MNIST, from torchvision's raw IDX files ----------------------------------------
# An IDX file: a 4-byte magic (0, 0, type code, number of dimensions), each dimension as a big-endian
# uint32, then the values. MNIST's images files are unsigned bytes (type 0x08) of (count, 28, 28).
IDX_IMAGES = {"train": 60_000, "t10k": 10_000}  # images in each canonical file, by name prefix
IDX_SIDE = 28
IDX_UBYTE = 0x08
IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def _idx_fix(path: Path) -> str:
    """How to replace a bad IDX file (the messages name `path` already)."""
    return f"delete it and allow the download (data.download=true), or put the canonical {path.name} there"


def _read_idx_header(f, path: Path, shape: tuple[int, ...]) -> None:
    """Check an IDX header against the `shape` of unsigned bytes it must announce, reading only the
    header: a file claiming gigabytes is refused before a byte of its body is read."""
    magic = f.read(4)
    if len(magic) < 4:
        what = "is empty" if not magic else f"has {len(magic)} bytes, too few for an IDX header"
        raise DataError(f"{path} {what}: it is not an IDX images file; {_idx_fix(path)}.")
    zeros, code, ndim = magic[:2], magic[2], magic[3]
    expected = (IDX_UBYTE << 8) | len(shape)
    if zeros != b"\0\0" or code not in IDX_TYPES or ndim != len(shape):
        raise DataError(f"{path} has the magic number 0x{int.from_bytes(magic, 'big'):08X}, expected "
                        f"0x{expected:08X} (an IDX file of {len(shape)}-d unsigned bytes): it is not an MNIST "
                        f"images file; {_idx_fix(path)}.")
    if code != IDX_UBYTE:
        raise DataError(f"{path} holds {IDX_TYPES[code]} values (IDX type 0x{code:02X}), expected unsigned bytes "
                        f"(0x{IDX_UBYTE:02X}): it is not the canonical MNIST file; {_idx_fix(path)}.")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path} ends inside its header: the file is truncated; {_idx_fix(path)}.")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    if dims != shape:
        times = lambda sizes: " x ".join(f"{d:,}" for d in sizes)  # noqa: E731
        raise DataError(f"{path} announces {times(dims)} values, expected {times(shape)} (the canonical file): "
                        f"refused unread; {_idx_fix(path)}.")


def read_idx(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An IDX file of unsigned bytes, plain or .gz, whose header must announce exactly `shape` -> a
    uint8 array of that shape. The body is read with a bound (its size and one byte more), so a
    gzip that inflates to gigabytes costs no more than the canonical file."""
    size = int(np.prod(shape))
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            _read_idx_header(f, path, shape)
            body = f.read(size + 1)
    except PermissionError:
        raise DataError(f"{path} is not readable (permission denied): give this user read access to it") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}. The file is corrupt; {_idx_fix(path)}.") from None
    if len(body) < size:
        raise DataError(f"{path} holds {len(body):,} bytes of values, fewer than the {size:,} its header "
                        f"announces: the file is truncated; {_idx_fix(path)}.")
    if len(body) > size:
        raise DataError(f"{path} holds more than the {size:,} bytes of values its header announces: it is not "
                        f"the canonical file; {_idx_fix(path)}.")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()  # (count, 28, 28)


def _idx_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, else `folder/name.gz` (a download kept compressed), else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


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
            try:
                self.splits = self.load()
            except PermissionError as err:  # past the folder checks, e.g. a folder listable but not searchable
                raise DataError(f"{err.filename or self.root} cannot be read (permission denied): give this user "
                                f"access to it, or point data.root (or $DISCRETE_VAE_DATA) elsewhere") from None
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
    """MNIST from torchvision's raw IDX files (read by `read_idx`), dynamically binarized per training batch.

    The last `num_val` of a fixed permutation (seed `split_seed`) of the 60k training images
    are held out for validation. Validation and test images are binarized once with a fixed
    seed, so their numbers are comparable across epochs and runs.
    """

    binarize_train = True
    dataset = "MNIST"  # the folder under data.root that holds raw/, as torchvision lays it out
    # torchvision's mirrors and MD5s of the compressed images files (labels are not used: no supervision)
    mirrors = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
    md5 = {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
           "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3"}

    def __init__(self, *args, num_val: int = 10_000, split_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        require_number("data.num_val", num_val, positive=True, integer=True, high=59_999)
        require_number("data.split_seed", split_seed, integer=True, low=0)
        self.num_val, self.split_seed = num_val, split_seed

    def _raw_folder(self) -> Path:
        return self.root / self.dataset / "raw"

    def _images_files(self) -> dict[str, Path]:
        """The train and t10k images files, downloaded if allowed and missing. torchvision's
        `processed/*.pt` are pickles (unpickling runs code): they are never read, only named."""
        raw = self._raw_folder()
        for folder in (self.root, self.root / self.dataset, raw):
            _require_readable(folder)
        names = {prefix: f"{prefix}-images-idx3-ubyte" for prefix in IDX_IMAGES}
        found = {prefix: _idx_file(raw, name) for prefix, name in names.items()}
        missing = [name for prefix, name in names.items() if found[prefix] is None]
        if not missing:
            return found
        if self.download:
            for name in missing:
                self._download_images(raw, name)
            return {prefix: _idx_file(raw, name) for prefix, name in names.items()}
        processed = self.root / self.dataset / "processed"
        pickles = sorted(p.name for p in processed.glob("*.pt")) if processed.is_dir() else []
        if pickles:
            raise DataError(
                f"{processed} holds only torchvision's pickled cache ({', '.join(pickles)}), never loaded (a pickle "
                f"can run code): the raw IDX files are needed. Put {' and '.join(missing)} (or .gz) in {raw}, or "
                f"allow the download with data.download=true."
            )
        raise DataError(
            f"torchvision {self.dataset} not found under {raw}: missing {' and '.join(missing)} (or .gz). Allow the "
            f"download with data.download=true or point data.root (or $DISCRETE_VAE_DATA) at a folder holding "
            f"{self.dataset}/raw."
        )

    def _download_images(self, raw: Path, name: str) -> None:
        """`name`.gz into `raw`, from the first mirror that serves it with the right MD5 (torchvision's)."""
        prefix = name.split("-")[0]
        max_bytes = 16 + IDX_IMAGES[prefix] * IDX_SIDE**2 + 4096  # a .gz of the canonical file is smaller
        offline_fix = (f"put train-images-idx3-ubyte and t10k-images-idx3-ubyte (or .gz) in {raw} and point "
                       f"data.root (or $DISCRETE_VAE_DATA) at the folder holding {self.dataset}/.")
        error = None
        for mirror in self.mirrors:
            try:
                _download(f"{mirror}{name}.gz", raw / f"{name}.gz", self.md5[name], max_bytes, offline_fix, "md5")
                return
            except DataError as err:
                error = err
        raise error

    def load(self) -> dict[str, Tensor]:
        files = self._images_files()
        train, test = (
            torch.from_numpy(read_idx(files[prefix], (IDX_IMAGES[prefix], IDX_SIDE, IDX_SIDE)))
            for prefix in ("train", "t10k")
        )  # (count, 28, 28) uint8 each
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
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) in torchvision's layout, 60k / 10k grey-level images
    of clothes, dynamically binarized as `DynamicMNIST` (the DisARM experiments' `fashion_mnist`);
    downloaded on first use into <root>/FashionMNIST/raw."""

    dataset = "FashionMNIST"
    mirrors = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
    md5 = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
           "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79"}
