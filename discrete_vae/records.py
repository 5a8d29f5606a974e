"""The run record: the contract between training, scripts/evaluate.py and the reports.

A run folder's `metrics.json` says what became of the run (`status`: one of STATUSES), its
final validation and test numbers, steps, wall time, estimator and overrides, and the machine
and commit it ran on; scripts/evaluate.py writes its result beside the checkpoint it evaluated,
under `evaluation_path(checkpoint, split)`. Both are strict JSON (no NaN: a number that is not
finite is `null`), written atomically: a kill or a full disk leaves the previous file whole.
discrete_vae.training writes records, discrete_vae.report reads them, and neither spells a
status or a file name of its own.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.json"
FINISHED, FAILED, DIVERGED, UNFINISHED = "finished", "failed", "diverged", "unfinished"
STATUSES = (FINISHED, FAILED, DIVERGED, UNFINISHED)  # UNFINISHED: no metrics.json (killed, or running)
DONE = (FINISHED, DIVERGED)  # a re-run with resume=auto leaves such runs as they are
EARLIER_DIR = "earlier"  # <run>/earlier/<time>/: an earlier attempt's files, set aside by a fresh start
EVAL_INFIX = "_eval_"  # scripts/evaluate.py's result of best-step5000.ckpt: best-step5000_eval_test.json
MAX_RECORD_BYTES = 16 * 2**20  # a metrics.json or an evaluation is a few KB: a larger file is refused unread
MAX_JSON_DEPTH = 32  # a record nests 3 deep (record, evaluation, metrics); deeper is no record of ours


def evaluation_path(checkpoint: Path, split: str = "test") -> Path:
    """Where scripts/evaluate.py writes its result for `checkpoint` on `split` (beside it)."""
    return checkpoint.with_name(f"{checkpoint.stem}{EVAL_INFIX}{split}.json")


def evaluation_paths(checkpoint: Path) -> list[Path]:
    """Every scripts/evaluate.py result of `checkpoint`, whatever the split."""
    return sorted(checkpoint.parent.glob(f"{checkpoint.stem}{EVAL_INFIX}*.json"))


def strict_json(value: Any) -> Any:
    """Non-finite floats as None (JSON has no NaN or Infinity), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_atomic(path: Path, data: bytes | str) -> None:
    """`data` into `path` through a temporary file of a unique name in the same folder, flushed to
    disk (fsync) and renamed over `path`: readers see the old file or the new one, never a part; a
    full disk or a kill fails before the rename and leaves the old file whole. A symlink at `path`
    is replaced, not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself, on disk
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # a folder that cannot be opened or synced (some filesystems): the file is whole
        pass


def write_json(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """`data` as strict JSON, atomically; returns what was written."""
    data = strict_json(data)
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return data


class BadRecord(ValueError):
    """A record file that is there but cannot be one: refused, not UTF-8, not JSON, nested too deep.
    Its message is one line naming the file and the fix."""


FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))


def read_small_file(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of `path` when it is a regular file of at most `max_bytes`, else OSError (FileNotFoundError
    when there is none). Records come from anywhere: a FIFO would block open() and read() for ever, a link to
    /dev/zero never ends, a file of gigabytes fills memory; each is refused at once, without reading it.
    Opened non-blocking (a FIFO opens at once) and checked with fstat on the open file (no race with a
    rename); a file that grows past `max_bytes` while it is read is refused too."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode, size = (info := os.fstat(fd)).st_mode, info.st_size
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in FILE_KINDS if test(mode)), "a special file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file; replace it with the file itself", str(path))
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{size:,} bytes, over the {max_bytes:,} such a file may have", str(path))
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise OSError(errno.EFBIG, f"it grew past the {max_bytes:,} bytes such a file may have", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_small_text(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> str:
    """`read_small_file` decoded as UTF-8, strictly (what this package and Hydra write): another encoding
    (UTF-16 with its BOM, Latin-1) raises UnicodeDecodeError (a ValueError) instead of reading as garbage."""
    return read_small_file(path, max_bytes).decode("utf-8")


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a JSON value, counted without recursion (a deep value must
    not raise RecursionError here); stops counting past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_JSON_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: Path) -> Any:
    """The JSON value in `path`; FileNotFoundError when there is none, BadRecord when it cannot be read
    (`read_small_file` refuses it), is not UTF-8, is not JSON, or nests deeper than any record (json's own
    recursion would escape as RecursionError, and whoever walks a deep value later would crash)."""
    try:
        text = read_small_text(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise BadRecord(f"{path} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise BadRecord(f"{path} is not UTF-8 ({err.reason} at byte {err.start}); write it as UTF-8 JSON") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadRecord(f"{path} nests too deeply to be a record (over {MAX_JSON_DEPTH} levels)") from None
    except ValueError as err:
        raise BadRecord(f"{path} is not JSON ({err})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadRecord(f"{path} nests too deeply to be a record (over {MAX_JSON_DEPTH} levels)")
    return value


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's metrics.json, or None when there is none or it is not a valid record."""
    record, problem = load_record(folder)
    return None if problem else record


def _number(value: Any) -> bool:
    """None or a number that is a float (an int of 400 digits is valid JSON, yet every mean and
    math.isfinite of it raises OverflowError)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


# key -> (what it must be, the check); a key that is absent is fine
FIELDS = {
    "status": ("one of " + ", ".join(s for s in STATUSES if s != UNFINISHED), lambda v: v in STATUSES and v != UNFINISHED),
    "metrics": ("an object of numbers", lambda v: isinstance(v, dict) and all(_number(x) for x in v.values())),
    "steps": ("a whole number", lambda v: v is None or (isinstance(v, int) and _number(v) and v >= 0)),
    "wall_time_s": ("a number", _number),
    "resumed_from_step": ("a whole number", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
    "overrides": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v)),
    "estimator": ("a string", lambda v: v is None or isinstance(v, str)),
    "seed": ("a number or a string", lambda v: v is None or isinstance(v, (int, str)) and not isinstance(v, bool)),
    "error": ("a string", lambda v: v is None or isinstance(v, str)),
    "best_checkpoint": ("a string", lambda v: v is None or isinstance(v, str)),
    "best_checkpoint_name": ("a string", lambda v: v is None or isinstance(v, str)),
    "commit": ("a string", lambda v: v is None or isinstance(v, str)),
    "machine": ("an object or a string", lambda v: v is None or isinstance(v, (dict, str))),
    "evaluation": ("an evaluation object", lambda v: isinstance(v, dict) and check_evaluation(v) is None),
}


def check_evaluation(evaluation: Any) -> str | None:
    """The first problem of a scripts/evaluate.py result, or None."""
    if not isinstance(evaluation, dict):
        return "it is not a JSON object"
    if not isinstance(evaluation.get("metrics"), dict) or not all(_number(v) for v in evaluation["metrics"].values()):
        return "metrics is not an object of numbers"
    for key in ("num_samples", "wall_time_s"):
        if not _number(evaluation.get(key)):
            return f"{key} is not a number"
    if not isinstance(evaluation.get("checkpoint", ""), str):
        return "checkpoint is not a string"
    return None


def load_record(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the folder's metrics.json, None), or (None, None) when there is none, or (None, the problem)
    when it is not a valid record: not a small regular file (a FIFO, a device), not UTF-8, not JSON, not
    an object, no status, or a field of the wrong type (a half-written or hand-edited file). Readers list
    such a run with the problem; none crashes."""
    path = folder / METRICS_FILE
    try:
        record = read_json(path)
    except FileNotFoundError:
        return None, None
    except BadRecord as err:
        return None, str(err)
    if not isinstance(record, dict):
        return None, f"{path} is not a JSON object"
    if "status" not in record:
        return None, f"{path} has no status"
    for key, (what, ok) in FIELDS.items():
        if key in record and not ok(record[key]):
            return None, f"{path}: {key} must be {what}, got {record[key]!r:.60}"
    return record, None


def done_record(folder: Path) -> dict[str, Any] | None:
    """The folder's record when its run is over (finished or diverged), else None."""
    record = read_record(folder)
    return record if record is not None and record.get("status") in DONE else None


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo where there is one), with its logical cores."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} logical cores)" if names else (platform.processor() or platform.machine())


def machine(accelerator: str = "auto") -> dict[str, Any]:
    """What the run ran on, for the record: CPU model, the GPU if it trained on one, torch threads."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and accelerator != "cpu" else None
    return {"cpu": cpu_name(), "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


@functools.cache
def source_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this package runs from, or None. Read once per
    process: the jobs of a multirun run the code loaded when it started, whatever the checkout holds
    by the time each job begins, so each records that commit."""
    try:
        # core.fsmonitor off: a checkout's fsmonitor hook is a program of its own, not ours to start
        out = subprocess.run(["git", "-c", "core.fsmonitor=false", "describe", "--always", "--dirty"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
