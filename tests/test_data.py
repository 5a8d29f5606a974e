"""Data: the real binarized MNIST loads exactly; bad files and missing data get clear errors;
downloads are atomic; batches cover each split once per epoch."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from discrete_vae import data as D
from discrete_vae.errors import DataError


def write_amat(folder, split, rows, gz=False, transform=lambda text: text):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(" ".join(str(v) for v in row) + "\n" for row in rows)
    text = transform(text).encode()
    path = folder / f"binarized_mnist_{split}.amat{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


@pytest.fixture
def small_rows(monkeypatch):
    """Make the expected split sizes tiny so corrupt files are quick to write."""
    monkeypatch.setattr(D, "NUM_ROWS", {"train": 5, "valid": 3, "test": 3})
    g = torch.Generator().manual_seed(0)
    return lambda n: (torch.rand(n, 784, generator=g) < 0.2).int().tolist()


def test_real_binarized_mnist(data_root):
    dm = D.BinarizedMNIST(root=str(data_root), download=False)
    splits = dm.load_splits()
    assert {k: tuple(v.shape) for k, v in splits.items()} == {"train": (50000, 784), "val": (10000, 784), "test": (10000, 784)}
    assert splits["train"].dtype == torch.uint8 and splits["train"].max() == 1
    # the mean pixel values stated in shared/data/README.md
    for name, mean in (("train", 0.13056), ("val", 0.13113), ("test", 0.13251)):
        assert splits[name].float().mean().item() == pytest.approx(mean, abs=5e-6)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DISCRETE_VAE_DATA", str(tmp_path / "env"))
    assert D.data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert D.data_root(None) == tmp_path / "env"
    monkeypatch.delenv("DISCRETE_VAE_DATA")
    monkeypatch.chdir(tmp_path)
    assert D.data_root(None) == tmp_path / "data"


def test_missing_file_without_download_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        D.BinarizedMNIST(root=str(tmp_path), download=False).load_splits()
    message = str(err.value)
    assert "binarized_mnist_train.amat" in message and str(tmp_path / "binarized_mnist") in message
    assert "data.root" in message and "DISCRETE_VAE_DATA" in message and "data.download=true" in message


@pytest.mark.parametrize("gz", [False, True])
def test_small_valid_files_load_plain_and_gzipped(tmp_path, small_rows, gz):
    rows = {s: small_rows(n) for s, n in D.NUM_ROWS.items()}
    for split, r in rows.items():
        write_amat(tmp_path / "binarized_mnist", split, r, gz=gz)
    splits = D.BinarizedMNIST(root=str(tmp_path), download=False).load_splits()
    assert splits["train"].tolist() == rows["train"] and splits["val"].tolist() == rows["valid"]


def test_other_whitespace_still_parses(tmp_path, small_rows):
    rows = small_rows(5)
    path = write_amat(tmp_path, "train", rows, transform=lambda t: t.replace("\n", " \r\n"))
    assert D._parse_amat(path.read_bytes(), path, 5).tolist() == rows


def test_truncated_file_is_reported(tmp_path, small_rows):
    write_amat(tmp_path / "binarized_mnist", "train", small_rows(4), gz=True)
    with pytest.raises(DataError, match=r"binarized_mnist_train.amat.gz has 4 lines, expected 5"):
        D.load_binarized_mnist(tmp_path, "train", download=False)


def test_non_binary_value_is_reported(tmp_path, small_rows):
    rows = small_rows(5)
    rows[2][100] = 2
    write_amat(tmp_path / "binarized_mnist", "train", rows)
    with pytest.raises(DataError, match=r"line 3 holds a value other than 0 or 1"):
        D.load_binarized_mnist(tmp_path, "train", download=False)


def test_wrong_width_is_reported(tmp_path, small_rows):
    rows = small_rows(5)
    rows[1] = rows[1][:-1]
    write_amat(tmp_path / "binarized_mnist", "train", rows)
    with pytest.raises(DataError, match=r"line 2 has 783 values, expected 784"):
        D.load_binarized_mnist(tmp_path, "train", download=False)


def test_corrupt_gzip_is_reported(tmp_path, small_rows):
    path = write_amat(tmp_path / "binarized_mnist", "train", small_rows(5), gz=True)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        D.load_binarized_mnist(tmp_path, "train", download=False)


def test_download_is_checked_and_atomic(tmp_path, small_rows, monkeypatch):
    source = tmp_path / "server"
    good = write_amat(source, "test", small_rows(3))
    monkeypatch.setattr(D, "BINARIZED_URL", source.as_uri() + "/")
    monkeypatch.setattr(D, "AMAT_SHA256", {"test": "0" * 64})
    with pytest.raises(DataError, match="SHA-256"):
        D.load_binarized_mnist(tmp_path / "root", "test", download=True)
    assert not (tmp_path / "root").exists(), "no partial file, nor the empty folders made for it, is left behind"

    monkeypatch.setattr(D, "AMAT_SHA256", {"test": hashlib.sha256(good.read_bytes()).hexdigest()})
    loaded = D.load_binarized_mnist(tmp_path / "root", "test", download=True)
    assert loaded.shape == (3, 784)
    assert [p.name for p in (tmp_path / "root" / "binarized_mnist").iterdir()] == ["binarized_mnist_test.amat"]


def test_failed_download_explains_the_offline_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "BINARIZED_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(DataError) as err:
        D.load_binarized_mnist(tmp_path / "data", "valid", download=True)
    assert "could not download" in str(err.value) and "data.root" in str(err.value)
    assert not (tmp_path / "data").exists(), "a failed download leaves no empty folder behind"


def test_batches_cover_the_split_once_per_epoch_in_a_new_order():
    data = torch.arange(23).repeat_interleave(2).view(23, 2).to(torch.uint8)
    batches = D.Batches(data, batch_size=5, shuffle=True)
    assert len(batches) == 5
    first = torch.cat(list(batches))[:, 0]
    second = torch.cat(list(batches))[:, 0]
    assert sorted(first.tolist()) == list(range(23)) and sorted(second.tolist()) == list(range(23))
    assert first.tolist() != second.tolist() and first.dtype == torch.float32
    ordered = torch.cat(list(D.Batches(data, 5, shuffle=False)))[:, 0]
    assert ordered.tolist() == list(range(23))


def test_dynamic_binarization_draws_fresh_pixels_replayable_by_seed():
    gray = torch.full((1000, 784), 0.3)
    batches = D.Batches(gray, 500, shuffle=False, binarize=True, seed=4)
    a1, a2 = list(batches)  # epoch 0, two batches
    b1, _ = list(batches)  # epoch 1
    assert set(a1.unique().tolist()) == {0.0, 1.0} and not torch.equal(a1, a2) and not torch.equal(a1, b1)
    assert a1.mean().item() == pytest.approx(0.3, abs=5 * (0.21 / a1.numel()) ** 0.5)
    again = D.Batches(gray, 500, shuffle=False, binarize=True, seed=4)
    assert torch.equal(next(iter(again)), a1), "the same seed, epoch and batch draw the same pixels"
    other = D.Batches(gray, 500, shuffle=False, binarize=True, seed=5)
    assert not torch.equal(next(iter(other)), a1)


def test_batches_resume_mid_epoch_from_their_state():
    data = torch.arange(40).view(40, 1).to(torch.uint8)
    straight = D.Batches(data, 4, shuffle=True, seed=1)
    epoch0 = [b[:, 0].tolist() for b in straight]
    epoch1 = [b[:, 0].tolist() for b in straight]
    assert epoch0 != epoch1

    broken = D.Batches(data, 4, shuffle=True, seed=1)
    served = []
    for batch in broken:  # a trainer reports each consumed batch; it pre-fetches one more
        broken.advance(epoch_length=10)
        served.append(batch[:, 0].tolist())
        if len(served) == 3:
            break
    state = broken.state_dict()
    assert state == {"epoch": 0, "consumed": 3, "seed": 1}
    resumed = D.Batches(data, 4, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    rest = []
    for batch in resumed:
        resumed.advance(epoch_length=10)
        rest.append(batch[:, 0].tolist())
    assert served + rest == epoch0
    assert resumed.state_dict()["epoch"] == 1 and [b[:, 0].tolist() for b in resumed] == epoch1


def test_an_epoch_cut_short_by_the_trainer_still_ends():
    data = torch.arange(40).view(40, 1).to(torch.uint8)
    batches = D.Batches(data, 4, shuffle=True, seed=1)
    for _ in range(2):  # limit_train_batches=2: the trainer consumes 2 batches and ends the epoch
        batches.advance(epoch_length=2)
    assert batches.state_dict() == {"epoch": 1, "consumed": 0, "seed": 1}


def test_ranks_take_disjoint_shares_that_cover_the_epoch():
    data = torch.arange(40).view(40, 1).to(torch.uint8)
    shares = [torch.cat(list(D.Batches(data, 4, shuffle=True, seed=2, rank=r, world_size=2)))[:, 0] for r in (0, 1)]
    assert len(D.Batches(data, 4, shuffle=True, rank=0, world_size=2)) == 5  # half the steps of one process
    assert set(shares[0].tolist()).isdisjoint(shares[1].tolist())
    assert sorted(torch.cat(shares).tolist()) == list(range(40))


@pytest.fixture
def small_idx(monkeypatch):
    """Make the expected IDX image counts tiny (30 train, 7 test), as `write_idx_mnist` writes them."""
    monkeypatch.setattr(D, "IDX_IMAGES", {"train": 30, "t10k": 7})


def write_idx_mnist(root, n_train, n_test, dataset="MNIST"):
    """Tiny torchvision-format MNIST or Fashion-MNIST (IDX files) under root/<dataset>/raw."""
    raw = root / dataset / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.numpy().tobytes())
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


@pytest.mark.parametrize("module", [D.DynamicMNIST, D.DynamicFashionMNIST])
def test_dynamic_mnist_splits_and_binarization(tmp_path, small_idx, module):
    """MNIST and Fashion-MNIST through our IDX reader, from small IDX files of the canonical format
    (no download here)."""
    write_idx_mnist(tmp_path, n_train=30, n_test=7, dataset=module.dataset)
    dm = module(root=str(tmp_path), download=False, num_val=10, batch_size=4)
    splits = dm.load_splits()
    assert splits["train"].shape == (20, 784) and splits["val"].shape == (10, 784) and splits["test"].shape == (7, 784)
    assert splits["train"].dtype == torch.float32 and 0 < splits["train"].max() <= 1  # grayscale in [0, 1]
    assert set(splits["val"].unique().tolist()) <= {0, 1} and set(splits["test"].unique().tolist()) <= {0, 1}
    # the held-out split and its binarization are fixed by the seed
    again = module(root=str(tmp_path), download=False, num_val=10).load_splits()
    assert torch.equal(splits["val"], again["val"]) and torch.equal(splits["train"], again["train"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 784) and set(batch.unique().tolist()) <= {0.0, 1.0}


def test_dynamic_mnist_missing_is_a_clear_error(tmp_path, small_idx):
    with pytest.raises(DataError, match="data.download=true"):
        D.DynamicMNIST(root=str(tmp_path), download=False).load_splits()
    with pytest.raises(DataError, match="torchvision FashionMNIST not found under .*FashionMNIST"):
        D.DynamicFashionMNIST(root=str(tmp_path), download=False).load_splits()
    write_idx_mnist(tmp_path, n_train=30, n_test=7)
    with pytest.raises(DataError, match="data.num_val=40 leaves no training images of the 30"):
        D.DynamicMNIST(root=str(tmp_path), download=False, num_val=40).load_splits()


# -- bad files and places: one clear line each ---------------------------------------------------
def test_a_gzip_that_inflates_past_the_canonical_size_is_refused_without_reading_it_all(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    limit = D.MAX_AMAT_BYTES["test"]
    with gzip.open(folder / "binarized_mnist_test.amat.gz", "wb", compresslevel=1) as f:
        for _ in range(limit // (1 << 20) + 2):  # a few KB on disk, more than the canonical file inflated
            f.write(b"0" * (1 << 20))
    with pytest.raises(DataError, match="holds more than the 10,000 images of the canonical file"):
        D.load_binarized_mnist(tmp_path, "test", download=False)


def test_an_unreadable_file_is_named_not_readable(tmp_path, small_rows, monkeypatch):
    path = write_amat(tmp_path / "binarized_mnist", "test", small_rows(3))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))  # as chmod 000 would for another user

    monkeypatch.setattr(type(path), "open", refuse)
    with pytest.raises(DataError, match=f"{path} is not readable"):
        D.load_binarized_mnist(tmp_path, "test", download=False)


def test_a_data_root_that_is_a_file_is_refused(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DataError, match="data.root is .*afile, a file"):
        D.data_root(str(afile))
    monkeypatch.setenv("DISCRETE_VAE_DATA", str(afile))
    with pytest.raises(DataError, match=r"\$DISCRETE_VAE_DATA is .*afile, a file"):
        D.BinarizedMNIST()


class Endless:
    """A download that never ends: 1 MB at a time."""

    def read(self, size):
        return b"0" * size

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("limit", ["size", "deadline"])
def test_a_download_past_its_size_or_deadline_is_stopped_and_leaves_nothing(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: Endless())
    if limit == "deadline":
        clock = iter(range(0, 10**6, 100))  # every read takes 100 s
        monkeypatch.setattr(D.time, "monotonic", lambda: next(clock))
    message = "larger than the canonical one" if limit == "size" else "took over 600 s"
    with pytest.raises(DataError, match=message):
        D.load_binarized_mnist(tmp_path / "data", "test", download=True)
    assert not (tmp_path / "data").exists(), "no .part file, nor the folders made for it, is left"


# -- hostile IDX files, torchvision's pickles, unreadable folders, Windows line ends ----------------
def idx_header(magic, *dims):
    return struct.pack(f">I{len(dims)}I", magic, *dims)


BAD_IDX = {  # name -> (bytes of train-images-idx3-ubyte, the message expected); counts as `small_idx`
    "gigabytes": (idx_header(2051, 60_000, 280_000, 280_000) + bytes(100),
                  r"announces 60,000 x 280,000 x 280,000 values, expected 30 x 28 x 28 \(the canonical file\)"),
    "huge_image": (idx_header(2051, 30, 65_536, 65_536), r"announces 30 x 65,536 x 65,536 values, expected 30 x 28"),
    "bad_magic": (idx_header(0x12345678, 30, 28, 28) + bytes(30 * 784),
                  r"magic number 0x12345678, expected 0x00000803"),
    "labels_file": (idx_header(2049, 30) + bytes(30), r"magic number 0x00000801, expected 0x00000803"),
    "empty": (b"", r"-idx3-ubyte(\.gz)? is empty: it is not an IDX images file"),
    "float32": (idx_header(0x0D03, 30, 28, 28) + bytes(4 * 30 * 784),
                r"holds float32 values \(IDX type 0x0D\), expected unsigned bytes \(0x08\)"),
    "short_header": (idx_header(2051, 30), r"ends inside its header: the file is truncated"),
    "truncated": (idx_header(2051, 30, 28, 28) + bytes(100),
                  r"holds 100 bytes of values, fewer than the 23,520 its header announces: the file is truncated"),
    "too_long": (idx_header(2051, 30, 28, 28) + bytes(30 * 784 + 1), r"holds more than the 23,520 bytes of values"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_a_bad_idx_file_is_refused_in_one_line(tmp_path, small_idx, case, gz):
    write_idx_mnist(tmp_path, n_train=30, n_test=7)
    content, message = BAD_IDX[case]
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError, match=message) as err:
        D.DynamicMNIST(root=str(tmp_path), download=False).load_splits()
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)) and "data.download=true" in text


class CountingFile:
    """A file that records the size asked of each read."""

    def __init__(self, f, reads):
        self.f, self.reads = f, reads

    def read(self, size=-1):
        self.reads.append(size)
        return self.f.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.f.close()


def test_an_idx_header_claiming_gigabytes_is_refused_from_the_header_alone(tmp_path, monkeypatch):
    """At the canonical sizes: a 16-byte file whose header claims ~5 TB is refused by its header
    (were the body read first, it would be reported as truncated), and the body is never read."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_header(2051, 60_000, 280_000, 280_000))
    reads, real_open = [], Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: CountingFile(real_open(self, *a, **k), reads))
    with pytest.raises(DataError, match=r"announces 60,000 x 280,000 x 280,000 values, expected 60,000 x 28 x 28"):
        D.read_idx(path, (60_000, 28, 28))
    assert reads == [4, 12], "only the magic and the three dimensions were read"


def test_an_idx_gzip_that_inflates_past_its_header_is_refused_with_a_bounded_read(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:  # a few KB on disk, the canonical size and 8 MB more inflated
        f.write(idx_header(2051, 10_000, 28, 28))
        for _ in range(16):
            f.write(bytes(1 << 20))
    with pytest.raises(DataError, match=r"holds more than the 7,840,000 bytes of values its header announces"):
        D.read_idx(path, (10_000, 28, 28))


def test_torchvision_processed_pickles_are_never_unpickled(tmp_path, small_idx, monkeypatch):
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):  # torchvision's legacy cache: a pickle, loaded by torch.load
        torch.save((torch.zeros(30, 28, 28, dtype=torch.uint8), torch.zeros(30, dtype=torch.long)), processed / name)

    def refuse(*args, **kwargs):
        raise AssertionError("a data file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(DataError) as err:
        D.DynamicMNIST(root=str(tmp_path), download=False).load_splits()
    text = str(err.value)
    assert "\n" not in text and "pickled cache (test.pt, training.pt)" in text and "raw IDX files are needed" in text
    assert str(tmp_path / "MNIST" / "raw") in text and "train-images-idx3-ubyte" in text
    assert "torch.load" not in Path(D.__file__).read_text(), "no code path of data.py unpickles a file"


def test_missing_idx_files_are_downloaded_from_a_mirror_and_checked(tmp_path, small_idx, monkeypatch):
    """The .gz images files come from the first mirror that serves them with the right MD5; a
    processed/ pickle beside them is left unread."""
    write_idx_mnist(tmp_path / "server", n_train=30, n_test=7)
    server = tmp_path / "server" / "MNIST" / "raw"
    md5 = {}
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        packed = gzip.compress((server / name).read_bytes())
        (server / f"{name}.gz").write_bytes(packed)
        md5[name] = hashlib.md5(packed).hexdigest()
    monkeypatch.setattr(D.DynamicMNIST, "mirrors", [(tmp_path / "down").as_uri() + "/", server.as_uri() + "/"])
    monkeypatch.setattr(D.DynamicMNIST, "md5", {**md5, "t10k-images-idx3-ubyte": "0" * 32})
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a data file was unpickled"))
    root = tmp_path / "root"
    (root / "MNIST" / "processed").mkdir(parents=True)
    torch.save(torch.zeros(1), root / "MNIST" / "processed" / "training.pt")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz has MD5 0*[1-9a-f].*, expected 0{32}; try again"):
        D.DynamicMNIST(root=str(root), download=True).load_splits()
    monkeypatch.setattr(D.DynamicMNIST, "md5", md5)
    splits = D.DynamicMNIST(root=str(root), download=True, num_val=10).load_splits()
    assert splits["train"].shape == (20, 784) and splits["test"].shape == (7, 784)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == [f"{n}.gz" for n in sorted(md5)]


def refuse_permission(monkeypatch, root, what):
    """As chmod 000 on `root` would for a user other than root (the tests run as root): listing it
    fails ("list"), and so does looking at anything below it; or ("search") only the latter, as for a
    folder with read but no search (x) permission."""
    real_scandir, real_stat = os.scandir, os.stat

    def below(path, strictly=True):
        if isinstance(path, int):
            return False
        path = Path(os.fsdecode(os.fspath(path))).absolute()
        return root in path.parents or (not strictly and path == root)

    def scandir(path="."):
        if what == "list" and below(path, strictly=False):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if below(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("what", ["list", "search"])
@pytest.mark.parametrize("module", [D.BinarizedMNIST, D.DynamicMNIST])
def test_an_unreadable_data_root_is_named_in_one_line(tmp_path, small_rows, small_idx, monkeypatch, module, what):
    root = tmp_path / "data"
    for split in D.NUM_ROWS:
        write_amat(root / "binarized_mnist", split, small_rows(D.NUM_ROWS[split]))
    write_idx_mnist(root, n_train=30, n_test=7)
    refuse_permission(monkeypatch, root, what)
    with pytest.raises(DataError) as err:
        module(root=str(root), download=False, **({"num_val": 10} if module is D.DynamicMNIST else {})).load_splits()
    text = str(err.value)
    assert "\n" not in text and "cannot be read (permission denied)" in text and "data.root" in text
    if what == "list":
        assert text.startswith(f"{root} cannot be read")
    else:
        assert text.startswith(str(root / ("binarized_mnist" if module is D.BinarizedMNIST else "MNIST")))


def amat_text(pixels, newline=b"\n"):
    """(rows, 784) 0/1 uint8 -> the .amat text, built with numpy (quick at the canonical sizes)."""
    rows = len(pixels)
    cells = np.stack([pixels + ord("0"), np.full_like(pixels, ord(" "))], axis=2).reshape(rows, -1)[:, :-1]
    ends = np.frombuffer(newline * rows, dtype=np.uint8).reshape(rows, len(newline))
    return np.concatenate([cells, ends], axis=1).tobytes()  # "0 1 ... 0" + newline, per row


def test_windows_line_ends_load_at_the_canonical_size(tmp_path):
    """A canonical-size split saved with "\r\n" is one byte a row longer: not "more than 10,000 images"."""
    pixels = (torch.rand(10_000, 784, generator=torch.Generator().manual_seed(0)) < 0.2).to(torch.uint8).numpy()
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    (folder / "binarized_mnist_test.amat").write_bytes(amat_text(pixels, b"\r\n"))
    loaded = D.load_binarized_mnist(tmp_path, "test", download=False)
    assert loaded.shape == (10_000, 784) and torch.equal(loaded, torch.from_numpy(pixels))


@pytest.mark.parametrize("gz", [False, True])
def test_windows_line_ends_load_small_files_with_the_row_count_checked(tmp_path, small_rows, gz):
    crlf = lambda text: text.replace("\n", "\r\n")  # noqa: E731
    rows = small_rows(5)
    write_amat(tmp_path / "binarized_mnist", "train", rows, gz=gz, transform=crlf)
    assert D.load_binarized_mnist(tmp_path, "train", download=False).tolist() == rows
    write_amat(tmp_path / "binarized_mnist", "train", rows[:4], gz=gz, transform=crlf)
    with pytest.raises(DataError, match=r"has 4 lines, expected 5"):
        D.load_binarized_mnist(tmp_path, "train", download=False)
