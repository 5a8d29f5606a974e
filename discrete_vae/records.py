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

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.json"
FINISHED, FAILED, DIVERGED, UNFINISHED = "finished", "failed", "diverged", "unfinished"
STATUSES = (FINISHED, FAILED, DIVERGED, UNFINISHED)  # UNFINISHED: no metrics.json (killed, or running)
DONE = (FINISHED, DIVERGED)  # a re-run with resume=auto leaves such runs as they are
EVAL_INFIX = "_eval_"  # scripts/evaluate.py's result of best-step5000.ckpt: best-step5000_eval_test.json


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


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file of a unique name in the same folder, flushed to
    disk (fsync) and renamed over `path`: readers see the old file or the new one, never a part, and
    a full disk fails before the rename. A symlink at `path` is replaced, not followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """`data` as strict JSON, atomically; returns what was written."""
    data = strict_json(data)
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return data


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's metrics.json, or None when there is none or it is not a JSON object."""
    try:
        record = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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


def source_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this package runs from, or None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
