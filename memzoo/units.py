"""Token counts as people write them: ``16K``, ``1M`` (binary: 1K = 1024 tokens). No torch needed."""

from __future__ import annotations

__all__ = ["parse_length", "format_length"]


def parse_length(text: str | int) -> int:
    """'16K' -> 16384, '1M' -> 1048576, '4096' -> 4096 (K and M are binary: 1K = 1024 tokens).

    Raises:
        ValueError: text that is not a length, or a length below 1.
    """
    if isinstance(text, int):
        n = text
    else:
        t = str(text).strip().upper()
        scale = {"K": 1024, "M": 1024**2}.get(t[-1:], 1)
        try:
            n = int(float(t[:-1] if scale > 1 else t) * scale)
        except ValueError:
            raise ValueError(f"cannot read a length from {text!r}; write e.g. 4096, 16K or 1M") from None
    if n < 1:
        raise ValueError(f"a length must be at least 1 token, got {text!r}")
    return n


def format_length(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M' (binary units, as the passkey grids use)."""
    if n >= 1024**2 and n % 1024**2 == 0:
        return f"{n // 1024**2}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)
