"""Opens this memzoo checkpoint with trust_remote_code=True; needs ``pip install memzoo``."""

from memzoo.model import MemZooForCausalLM

__all__ = ["MemZooForCausalLM"]
