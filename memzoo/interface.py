"""The one interface every memory design implements. Read this file first.

A *memory design* replaces self-attention inside a transformer block. It is a token mixer that
carries a state from one call to the next, so that a stream of any length can be fed to it in
pieces of any size:

    state = module.init_state(batch_size)
    for piece in stream:                      # piece: [b, n, d], any n >= 1
        y, state = module(piece, state)       # y: [b, n, d]

Dimension legend (used in every comment and einops pattern in memzoo):

    b  batch                     h  heads
    n  tokens in this call       s  tokens in a segment (a design's own unit of work)
    c  tokens in a chunk         d  model width
    k  key/query head dim        v  value head dim
    m  memory slots (cache entries, persistent tokens)
    l  layers                    t  cached tokens (keys/values kept by an eviction policy)

Rules every design keeps (the conformance suite in ``tests/test_interface.py`` checks them):

* **Split invariance**: outputs depend on the stream, never on how it was cut into calls.
  A design with a segment length or an eviction rhythm counts stream positions and keeps the
  unfinished segment in its state.
* **Causality**: no output depends on a later token.
* **Bounded state**: ``state.nbytes()`` is bounded by the config, whatever the stream length
  (only ``full`` grows).
* **No position overflow**: no position larger than the config allows is ever used.
* **State in, state out**: a module never stores state on ``self`` and never modifies the state
  it was given (so a state can be reused, e.g. to ask several questions after one long context).
* **A memory-off control**: inside :func:`memory_off` a design keeps only its local context (its
  window, segment or recent cache), so that every result can be read beside the same model with
  its memory switched off; only a design that keeps every token (``full``) has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .validation import check_fields

__all__ = ["MemoryState", "MemoryModule", "MemoryConfig", "map_tensors", "iter_tensors", "memory_off", "describe_memory_off"]


def map_tensors(value: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside ``value`` (tensors, MemoryStates, lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, MemoryState):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def iter_tensors(value: Any):
    """Every tensor inside ``value`` (tensors, states and other dataclasses, lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from iter_tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_tensors(v)


@dataclasses.dataclass
class MemoryState:
    """Everything a :class:`MemoryModule` carries from one call to the next.

    Designs subclass it as a ``@dataclass`` whose fields are tensors (or nested states, lists of
    them, or plain ints such as a stream position). ``detach``, ``nbytes``, ``to``,
    ``expand_batch`` and ``select_rows`` work on any such subclass without extra code, given one convention:
    **every tensor in a state has the batch as its first dimension** (the conformance suite checks it).
    """

    def detach(self) -> MemoryState:
        """A copy whose tensors are cut from the autograd graph (a truncated-BPTT boundary)."""
        return map_tensors(self, Tensor.detach)

    def nbytes(self) -> int:
        """Bytes held by the state's tensors. Bounded designs stay flat as the stream grows."""
        seen: set[int] = set()
        total = 0
        for t in iter_tensors(self):
            if id(t) not in seen:  # a tensor shared by two fields counts once
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def expand_batch(self, batch_size: int) -> MemoryState:
        """Copy a batch-1 state to ``batch_size`` rows (e.g. one shared context, several questions)."""

        def expand(t: Tensor) -> Tensor:
            if t.shape[0] != 1:
                raise ValueError(f"expand_batch needs a state of batch size 1, got a tensor of shape {tuple(t.shape)}")
            return t.expand(batch_size, *t.shape[1:]).contiguous()

        expanded = map_tensors(self, expand)
        if hasattr(expanded, "batch_size"):
            expanded = dataclasses.replace(expanded, batch_size=batch_size)
        return expanded

    def select_rows(self, index: Tensor) -> MemoryState:
        """The rows ``index`` [b'] of the batch, in that order (repeats allowed): reorders beams,
        repeats a prompt's state for several samples."""
        selected = map_tensors(self, lambda t: t.index_select(0, index.to(t.device)))
        if hasattr(selected, "batch_size"):
            selected = dataclasses.replace(selected, batch_size=int(index.numel()))
        return selected

    def to(self, device=None, dtype=None) -> MemoryState:
        """Move every tensor (floating tensors only are cast to ``dtype``)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return map_tensors(self, move)


@dataclasses.dataclass
class MemoryConfig:
    """Base of every design's config dataclass (its fields are the design's knobs).

    A design's config knows how to build its module, so the registry only stores configs. Its
    fields are checked on creation (:func:`~memzoo.validation.check_fields`: each field's type and
    the range declared in its ``metadata``); subclasses add the checks that relate two fields.
    """

    def __post_init__(self):
        check_fields(self)

    def build_module(self, backbone, layer_idx: int) -> MemoryModule:
        """The module for layer ``layer_idx`` of a backbone.

        Args:
            backbone: the model's :class:`~memzoo.MemZooConfig` (read ``d_model``, ``n_heads``,
                ``rope_theta`` from it).
            layer_idx: which layer (0-based).
        """
        raise NotImplementedError


class MemoryModule(nn.Module):
    """A token mixer with memory: replaces self-attention in a block.

    Subclasses implement :meth:`init_state` and :meth:`forward`. They may define
    ``reset_memory_parameters()`` to give their own parameters a special initialisation (e.g. a
    gate bias); the backbone calls it after its generic init of Linear/Embedding/RMSNorm.

    The memory-off control: a design whose memory can be switched off says what that means in
    :attr:`memory_off_means` and honours :attr:`memory_off` in ``forward`` (set by
    :func:`memory_off`); after switching off, nothing may reach a token from beyond the design's
    local context (its window, segment or recent cache), so hits that remain are local context.
    """

    #: True inside :func:`memory_off` (checked by ``forward``; submodules may carry it too).
    memory_off: bool = False

    @property
    def memory_off_means(self) -> str | None:
        """What :func:`memory_off` does to this design, in a sentence; None: it cannot be switched off."""
        return None

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MemoryState:
        """The state before the first token of a stream.

        Args:
            batch_size: b, the number of streams processed side by side.
            device: where the state's tensors live (default: the module's parameters' device).
            dtype: floating dtype of the state (default: float32; memory maths stays in fp32
                under autocast).
        """
        raise NotImplementedError

    def forward(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """Mix the next ``n >= 1`` tokens of the stream.

        Args:
            x: [b, n, d] the next tokens' hidden states.
            state: the state returned by the previous call (or ``init_state``).

        Returns:
            y: [b, n, d] and the next state. ``state`` itself is left untouched.
        """
        raise NotImplementedError

    def weights_from_attention(self, attention: dict[str, Tensor]) -> dict[str, Tensor]:
        """This module's parameters that can start from a trained softmax-attention layer (warm start).

        Args:
            attention: the ``full`` design's mixer parameters of the same layer, by their names
                inside the mixer: ``qkv.weight`` [3d, d] (rows: queries, keys, values) and
                ``out.weight`` [d, d].

        Returns:
            tensors for this module's own parameter names (inside the mixer) whose names differ
            from the attention's; parameters with the same name and shape are copied without it.
            Default: none.
        """
        return {}

    def _default_device(self, device) -> torch.device:
        if device is not None:
            return torch.device(device)
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def describe_memory_off(model: nn.Module) -> str | None:
    """What :func:`memory_off` does to ``model`` (its designs' ``memory_off_means``), or None if a design has no control.

    Raises:
        ValueError: ``model`` holds no memzoo memory module.
    """
    mixers = [m for m in model.modules() if isinstance(m, MemoryModule)]
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no memzoo memory modules: nothing to switch off")
    means = [m.memory_off_means for m in mixers]
    return None if None in means else "; ".join(dict.fromkeys(means))


@contextlib.contextmanager
def memory_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every memory switched off: the control a memory's result is read beside.

    Inside the block each design keeps only its local context (:attr:`MemoryModule.memory_off_means`
    says what that is for the design): the Infini and Titans memories are never written, an
    eviction cache keeps its most recent ``budget`` tokens. Start new streams inside the block (a
    state carried in from outside still holds what was written before). A needle found with the
    memory on but not off was found by the memory::

        with memzoo.memory_off(model):
            control = evaluate_passkey(model, lengths=[16384], depths=[0.5], n_keys=5)

    Raises:
        ValueError: if a design of the model has no memory to switch off (``full`` keeps every
            token: its control is ``window`` at the budget compared).
    """
    if describe_memory_off(model) is None:
        design = getattr(getattr(model, "config", None), "memory", type(model).__name__)
        raise ValueError(
            f"{design!r} has no memory to switch off (it keeps every token it was given): "
            "compare it with the window design at the budget of the designs it is compared with"
        )
    switched = [m for m in model.modules() if hasattr(m, "memory_off")]
    before = [m.memory_off for m in switched]
    for m in switched:
        m.memory_off = True
    try:
        yield model
    finally:
        for m, was in zip(switched, before):
            m.memory_off = was
