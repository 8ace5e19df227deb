"""Crash-safe files: every write goes to a temporary file in the same folder, then a rename.

A run killed at any instant leaves either the old file or the new one, never half of one,
so `--resume` can always trust what it finds.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, default=str))


def save_checkpoint(blob: dict, path: str | Path) -> None:
    """`torch.save` of tensors, numbers and strings only: loadable with weights_only=True."""
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Never unpickles code: a file holding Python objects is refused."""
    from wgates.errors import WgatesError

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise WgatesError(
            f"{path} holds Python objects, not plain tensors: wgates will not load it "
            "(unpickling can run code); delete it to start over"
        ) from None
    except Exception as err:
        raise WgatesError(
            f"{path} is not a readable checkpoint ({type(err).__name__}): it may be cut short; "
            "delete it to start over"
        ) from None
