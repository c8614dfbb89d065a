"""Warm start: begin training a design from another checkpoint's weights (e.g. a trained ``full`` backbone).

Every design wraps the same backbone (embeddings, norms, feed-forward blocks, and for most designs
the attention projections under the same names), so a design can start from a backbone trained
with plain attention and spend its own budget learning only to use its memory. This is how the
Infini-attention paper reaches 1M tokens (continual pre-training of an existing LLM), and it
keeps a comparison honest when every design starts from the same weights: the recipe's card
then reports the source checkpoint's training time beside its own.

A tensor is copied when the source has the same name and shape. Where a design names its
attention differently (Titans splits queries from keys/values), the design says how its
parameters come from a softmax-attention layer (:meth:`MemoryModule.weights_from_attention
<memzoo.interface.MemoryModule.weights_from_attention>`). The design's own parameters (memory gates,
neural memory, ...) keep their initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..interface import MemoryModule

__all__ = ["warm_start"]


@torch.no_grad()
def warm_start(model: torch.nn.Module, checkpoint: str | Path) -> dict:
    """Copy into ``model`` every parameter of ``checkpoint`` with the same name and shape.

    Args:
        model: the freshly built model (any design).
        checkpoint: a folder written by ``save_pretrained`` (its ``model.safetensors`` is read).

    Returns:
        ``{"source", "copied": [names], "kept_init": [names]}``: the model's parameters taken from
        the checkpoint and those left at their initialisation.

    Raises:
        FileNotFoundError: no ``model.safetensors`` in the folder.
        ValueError: a shared name with another shape (the backbones differ: build the model with
            the checkpoint's ``d_model`` / ``n_layers`` / ``n_heads``), or nothing in common.
    """
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"cannot warm-start from {str(checkpoint)!r}: no {path} (a folder written by save_pretrained)")
    source = load_file(str(path))
    for prefix, module in model.named_modules():
        if isinstance(module, MemoryModule):
            attention = {name[len(prefix) + 1 :]: t for name, t in source.items() if name.startswith(prefix + ".")}
            if {"qkv.weight", "out.weight"} <= set(attention):  # the source is softmax attention here
                # the mapping wins over a same-named source tensor: e.g. titans-mac's own W_O (I, after the
                # attention's W_O, which goes to attn_out) must not take the attention's W_O a second time
                source |= {f"{prefix}.{name}": tensor for name, tensor in module.weights_from_attention(attention).items()}
    copied, kept_init = [], []
    for name, param in model.named_parameters():
        if name not in source:
            kept_init.append(name)
            continue
        if source[name].shape != param.shape:
            raise ValueError(
                f"cannot warm-start {name} {tuple(param.shape)} from {checkpoint} {tuple(source[name].shape)}: "
                "build the model with the same d_model / n_layers / n_heads as the checkpoint"
            )
        param.copy_(source[name].to(param.dtype))
        copied.append(name)
    if not copied:
        raise ValueError(f"{checkpoint} shares no parameter with this model: is it a memzoo checkpoint?")
    return {"source": str(checkpoint), "copied": copied, "kept_init": kept_init}
