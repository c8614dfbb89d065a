"""memzoo: long-context memory designs for transformers, side by side in one backbone.

    import memzoo
    memzoo.available()                       # registry names
    model = memzoo.build("titans-mac", d_model=256, n_layers=4)
    model = memzoo.load("checkpoints/passkey-infini")
"""

from transformers import AutoConfig, AutoModelForCausalLM

from . import memories  # noqa: F401  (registers every design)
from .config import MemZooConfig
from .interface import MemoryConfig, MemoryModule, MemoryState
from .io import load
from .model import MemZooForCausalLM, MemZooState, shift_labels
from .registry import available, build, memory_config, register, swap_memory
from .tokenizer import tokenizer

__version__ = "0.1.0"

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
    "MemZooConfig",
    "MemZooForCausalLM",
    "MemZooState",
    "shift_labels",
]

AutoConfig.register("memzoo", MemZooConfig, exist_ok=True)
AutoModelForCausalLM.register(MemZooConfig, MemZooForCausalLM, exist_ok=True)
