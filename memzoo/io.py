"""Loading checkpoints (saving is :meth:`MemZooForCausalLM.save_pretrained`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load"]


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
