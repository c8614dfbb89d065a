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

__all__ = ["load", "atomic_directory"]


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary folder beside ``target``, renamed into place on success.

    An interrupted write never leaves a half-written folder under ``target`` (the previous one
    stays until the new one is complete); on an exception the temporary folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
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
