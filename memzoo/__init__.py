"""memzoo: long-context memory designs for transformers, side by side in one backbone.

    import memzoo
    memzoo.available()                       # registry names
    model = memzoo.build("titans-mac", d_model=256, n_layers=4)
    model = memzoo.load("checkpoints/passkey-infini")

``import memzoo`` itself is light (no torch, no transformers): each public name is imported the
first time it is used, so the ``memzoo`` command answers ``--help`` and argument errors at once.
memzoo's checkpoints still open with ``transformers.AutoModelForCausalLM.from_pretrained(path)``
after ``import memzoo``: memzoo registers its config and model with transformers' Auto classes
when transformers is imported (at once if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and the API docs
    from .config import MemZooConfig
    from .interface import MemoryConfig, MemoryModule, MemoryState, memory_off
    from .io import load
    from .model import MemZooForCausalLM, MemZooState, shift_labels
    from .registry import available, build, memory_config, register, swap_memory
    from .tokenization import tokenizer

__version__ = "0.1.0"

#: public name -> the module that defines it
_HOME = {
    "available": "registry",
    "build": "registry",
    "load": "io",
    "register": "registry",
    "memory_config": "registry",
    "swap_memory": "registry",
    "tokenizer": "tokenization",
    "MemoryConfig": "interface",
    "MemoryModule": "interface",
    "MemoryState": "interface",
    "memory_off": "interface",
    "MemZooConfig": "config",
    "MemZooForCausalLM": "model",
    "MemZooState": "model",
    "shift_labels": "model",
}

__all__ = [
    "available",
    "build",
    "load",
    "register",
    "memory_config",
    "swap_memory",
    "tokenizer",
    "MemoryConfig",
    "MemoryModule",
    "MemoryState",
    "memory_off",
    "MemZooConfig",
    "MemZooForCausalLM",
    "MemZooState",
    "shift_labels",
]
assert set(__all__) == set(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'memzoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


def _register_with_transformers() -> None:
    """``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type: memzoo`` (importing memzoo.model does it)."""
    importlib.import_module(".model", __name__)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_with_transformers` right after ``import transformers`` completes.

    It finds nothing itself: on the first import of ``transformers`` it steps aside (removes itself)
    and wraps the real loader, so transformers' own ``__init__`` runs untouched and first.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if "memzoo.config" not in sys.modules:  # else memzoo is importing transformers itself, and registers
                    _register_with_transformers()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
