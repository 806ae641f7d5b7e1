"""Checkpoint folders that a crash cannot leave half-written and a changed config cannot reuse.

A checkpoint is written into a fresh sibling folder ``<dir>.tmp`` and then swapped in by
renames: ``<dir>`` → ``<dir>.old``, ``<dir>.tmp`` → ``<dir>``, and ``<dir>.old`` removed.  A crash
leaves either the previous complete checkpoint or the new one; between the two renames only
``<dir>.old`` holds one, and ``locate`` finds it there.  Under torchrun every rank writes its
own files into the same temporary folder and rank 0 swaps it in, between barriers.

Loading checks the run: a checkpoint whose stored config differs from the config asked for is
refused with the names of the fields that differ, and a folder that does not exist is an error,
not a silent fresh start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from minigrpo.distributed import dist_info

STATE_FILE = "trainer_state.pt"
"""the file whose presence marks a complete checkpoint"""


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def write_atomically(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on every rank with a fresh temporary folder, then make that folder
    ``directory``, replacing the checkpoint there, if any, only once every rank has written."""
    directory = Path(directory)
    tmp, old = _sibling(directory, ".tmp"), _sibling(directory, ".old")
    rank, _ = dist_info()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    _barrier()
    if rank == 0:
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def locate(directory: str | Path | None) -> Path | None:
    """The folder holding the complete checkpoint written to ``directory`` (``directory``
    itself, or ``<directory>.old`` after a crash between the swap's renames), None if none."""
    if directory is None:
        return None
    directory = Path(directory)
    for folder in (directory, _sibling(directory, ".old")):
        if (folder / STATE_FILE).exists():
            return folder
    return None


def to_resume(directory: str | Path | None) -> Path | None:
    """The checkpoint a ``--resume`` run continues from: None (start at step 0) when the folder
    exists but holds none yet; a ``ValueError`` when no folder is given or it does not exist
    (a mistyped path must not silently train from scratch)."""
    if directory is None:
        raise ValueError("--resume needs --checkpoint-dir")
    found = locate(directory)
    if found is None and not Path(directory).is_dir():
        raise ValueError(f"--resume: no folder {str(directory)!r} (create it to start a resumable run there)")
    return found


def check_config(saved: dict, current: dict) -> None:
    """``ValueError`` naming every field where the checkpoint's config differs from this run's."""
    differ = sorted(k for k in saved.keys() | current.keys() if _plain(saved.get(k)) != _plain(current.get(k)))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in differ)
        raise ValueError(f"the checkpoint was written by a run with another config ({details}); "
                         "resume with the same settings or start a new checkpoint folder")


def _plain(value):
    """Tuples as lists, so a config compares equal after a save/load round trip."""
    return list(value) if isinstance(value, tuple) else value
