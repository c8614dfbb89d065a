"""The registry: one name per memory design, a builder per name.

A design registers a zero-argument *builder* that returns its config dataclass with the numbers
that make it that design (torchtune-style: builders fix numbers, constructors stay small)::

    @register("window")
    def window() -> KVConfig:
        return KVConfig(policy="window")

``build(name, **overrides)`` then makes a whole model; overrides may name backbone fields
(``d_model``, ``n_layers``...) or fields of the design's config (``budget``, ``segment_len``...).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import BACKBONE_FIELDS, MemZooConfig
from .interface import MemoryConfig
from .validation import unknown_name

__all__ = ["register", "available", "memory_config", "build", "swap_memory", "catalog", "CATALOG", "WEIGHT_SHAPING_OPTIONS"]

#: every design's config class and defaults, written from the live registry by ``python -m
#: memzoo.registry`` so that ``memzoo list`` answers without importing torch (a test keeps the two equal)
CATALOG = Path(__file__).with_name("catalog.json")

#: design options that decide the shapes of weights: :func:`swap_memory` keeps the source's value (a
#: ``full`` model with a 4-tap conv becomes an ``h2o`` model with the same conv) unless overridden
WEIGHT_SHAPING_OPTIONS = ("conv_kernel",)

_BUILDERS: dict[str, Callable[[], MemoryConfig]] = {}


def _builders() -> dict[str, Callable[[], MemoryConfig]]:
    """Every registered builder; the first call imports ``memzoo.memories``, whose modules register the designs."""
    importlib.import_module("memzoo.memories")
    return _BUILDERS


def register(name: str):
    """Decorator: register a builder (``() -> MemoryConfig``) under ``name``."""

    def decorator(builder: Callable[[], MemoryConfig]):
        if name in _BUILDERS:
            raise ValueError(f"memory design {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Registry names of every memory design, sorted."""
    return sorted(_builders())


def _check_name(name: str) -> None:
    if name not in _builders():
        raise unknown_name("memory", name, available())


def memory_config(name: str, **overrides: Any) -> MemoryConfig:
    """The config dataclass of design ``name`` with ``overrides`` applied.

    Raises:
        ValueError: unknown name (with a did-you-mean and the list).
        TypeError: an override that is not a field of the design's config.
    """
    _check_name(name)
    config = _BUILDERS[name]()
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"{name!r} has no option {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid))}")
    return dataclasses.replace(config, **overrides)


def build(name: str, **overrides: Any):
    """Build a :class:`~memzoo.MemZooForCausalLM` whose every layer uses memory design ``name``.

    Args:
        name: a name from :func:`available` (e.g. ``"titans-mac"``).
        **overrides: backbone fields (``vocab_size, d_model, n_layers, n_heads, d_ff, rope_theta,
            norm_eps, initializer_range, tie_word_embeddings``) and/or fields of the design's config.

    Raises:
        ValueError: unknown name.
        TypeError: an override that is neither a backbone field nor a field of the design.

    Example:
        >>> model = memzoo.build("titans-mac", d_model=256, n_layers=4, segment_len=512)
    """
    from .model import MemZooForCausalLM  # model imports the registry: import late

    _check_name(name)
    design_fields = {f.name for f in dataclasses.fields(_BUILDERS[name]())}
    backbone = {k: v for k, v in overrides.items() if k in BACKBONE_FIELDS}
    design = {k: v for k, v in overrides.items() if k not in BACKBONE_FIELDS}
    unknown = sorted(set(design) - design_fields)
    if unknown:
        valid = sorted(set(BACKBONE_FIELDS) | design_fields)
        raise TypeError(f"build({name!r}) got unknown option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    config = memory_config(name, **design)
    return MemZooForCausalLM(MemZooConfig(memory=name, memory_config=dataclasses.asdict(config), **backbone))


def swap_memory(model, name: str, **overrides: Any):
    """The same backbone and weights with another memory design (e.g. a full-attention model with H2O).

    Every weight of ``model`` must exist in the new model with the same shape (true between KV
    designs, which share the attention projections); weights only the new design has (e.g. NAMM's
    scorer) keep their initial values.

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM`.
        name: the new design's registry name.
        **overrides: fields of the new design's config (backbone fields cannot change).

    Raises:
        ValueError: the two designs' weights do not match (e.g. ``full`` -> ``infini``).
    """
    backbone = {k: getattr(model.config, k) for k in BACKBONE_FIELDS}
    bad = set(overrides) & set(BACKBONE_FIELDS)
    if bad:
        raise TypeError(f"swap_memory keeps the backbone; cannot override {sorted(bad)}")
    target_fields = {f.name for f in dataclasses.fields(memory_config(name))}
    source_options = model.config.memory_config or {}
    kept = {k: source_options[k] for k in WEIGHT_SHAPING_OPTIONS if k in source_options and k in target_fields}
    new = build(name, **backbone, **{**kept, **overrides})
    old_sd, new_sd = model.state_dict(), new.state_dict()
    unexpected = [k for k in old_sd if k not in new_sd or new_sd[k].shape != old_sd[k].shape]
    if unexpected:
        raise ValueError(
            f"{model.config.memory!r} weights do not fit {name!r} (e.g. {unexpected[:3]}); swap between designs that share weights"
        )
    new.load_state_dict(old_sd, strict=False)
    return new.to(next(model.parameters()).device)


def catalog() -> dict[str, dict]:
    """``{name: {"config": class name, "defaults": {field: value}}}`` of every registered design."""
    configs = {name: memory_config(name) for name in available()}
    return {name: {"config": type(cfg).__name__, "defaults": dataclasses.asdict(cfg)} for name, cfg in configs.items()}


if __name__ == "__main__":  # python -m memzoo.registry: rewrite the catalog after adding or changing a design
    import json

    from memzoo import registry  # the module the designs register into (this file runs as __main__)

    designs = registry.catalog()
    CATALOG.write_text(json.dumps(designs, indent=1) + "\n")
    print(f"wrote {CATALOG} ({len(designs)} designs)")
