"""Opens this memzoo checkpoint with trust_remote_code=True; needs ``pip install memzoo``."""

from memzoo.config import MemZooConfig

__all__ = ["MemZooConfig"]
