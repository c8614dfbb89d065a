"""Loading checkpoints (saving is :meth:`MemZooForCausalLM.save_pretrained`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["load", "atomic_directory", "recover_directory", "write_text_atomic", "atomic_file"]


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (a rename is only as durable as its data)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_directory(target: str | Path) -> bool:
    """Finish a swap of :func:`atomic_directory` that a kill interrupted, and clean up what it left.

    A swap renames the old folder to ``.<name>.old``, then the complete new one into place. A kill
    between the two renames leaves no ``target`` but a complete copy in ``.<name>.old``: it is
    renamed back. Temporary ``.<name>.tmp.*`` folders of killed writes are removed.

    Returns:
        True if ``target`` was restored from ``.<name>.old``.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    restored = False
    if not target.exists() and old.is_dir():
        os.replace(old, target)
        _fsync_dir(target.parent)
        restored = True
    elif target.exists():
        shutil.rmtree(old, ignore_errors=True)  # the swap completed: the previous copy is not needed
    for orphan in target.parent.glob(f".{target.name}.tmp.*"):
        shutil.rmtree(orphan, ignore_errors=True)
    return restored


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Write one file atomically: yields a temporary path beside ``target`` (same suffix, so writers
    that pick a format from it still work), renamed over ``target`` when the block ends without an
    exception. An interrupted write leaves the previous file whole; the temporary file is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    """``Path(target).write_text(text)``, atomically (see :func:`atomic_file`)."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary folder beside ``target``, renamed into place on success.

    An interrupted write never leaves a half-written folder under ``target`` (the previous one
    stays until the new one is complete, and is flushed to disk before the swap); on an exception
    the temporary folder is removed. A kill in the middle of the swap is repaired by
    :func:`recover_directory`, which every writer and :func:`load` call first. One writer per
    target at a time (rank 0 in distributed runs).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a memzoo checkpoint (a folder with ``config.json`` and ``model.safetensors``).

    Args:
        path: the folder written by ``model.save_pretrained(path)``.
        dtype: dtype of the loaded parameters (checkpoints may be stored in bf16 to stay small).
        device: where to put the model.

    Returns:
        a :class:`~memzoo.MemZooForCausalLM` in eval mode.
    """
    from .model import MemZooForCausalLM

    path = Path(path)
    recover_directory(path)  # a save killed between its two renames left the checkpoint as .<name>.old
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no memzoo checkpoint at {str(path)!r}: expected {config_file} (written by model.save_pretrained)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "memzoo":
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} model, not a memzoo one; "
            "load it with transformers.AutoModelForCausalLM (and memzoo.hf.EvictingCache for eviction)"
        )
    model = MemZooForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()
