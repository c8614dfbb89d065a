"""Tolerances for comparing two floating-point computations, derived from the dtype and the operation.

Two forms of one computation (naive vs fast, one call vs a split stream, one process vs an
all-reduce) differ only by rounding, and how much depends on the dtype (its machine epsilon) and
on how many roundings stand between input and output. Which CPU runs the suite changes the
*order* of those roundings (AVX2 vs AVX-512 kernels, MKL's blocking, oneDNN's bf16 paths), never
their number, so a tolerance derived here holds on any x86-64 machine; a literal tuned on one
machine did not.

The model: a reduction of ``n`` terms, each rounded, in two different orders differs by about
``sqrt(n) * eps`` relative to the size of its terms (the worst case is ``n * eps``, the typical
random walk ``sqrt(n) * eps``); ``depth`` such reductions in series (layers, segments, steps)
add up; ``SAFETY`` covers the walk's tail and the few extra ops (softmax, norms) around each
reduction. Errors are relative to the *terms*, not the result, so a sum that cancels to nearly 0
needs an absolute tolerance at the terms' scale: pass ``scale``.

Exact comparisons (``atol=0, rtol=0``) are for computations that are bit-identical by
construction (the same ops on the same inputs in the same order), each with a comment saying why.
"""

from __future__ import annotations

import math

import torch

#: factor over the random-walk estimate; the walk's tail at ~4 sigma, and ~4 ops around each reduction
SAFETY = 16.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of ``dtype`` (fp32 1.19e-7, fp64 2.2e-16, bf16 7.8e-3)."""
    return torch.finfo(dtype).eps


def rounding(dtype: torch.dtype = torch.float32, *, n: int = 1, depth: int = 1) -> float:
    """Relative difference expected between two orders of the same computation.

    Args:
        dtype: the dtype the computation runs in.
        n: length of the longest reduction (a matmul's inner dimension, a sum over tokens).
        depth: reductions in series (layers x segments, recurrence steps, optimiser steps).
    """
    return SAFETY * eps(dtype) * math.sqrt(max(n, 1)) * max(depth, 1)


def tol(dtype: torch.dtype = torch.float32, *, n: int = 1, depth: int = 1, scale: float = 1.0) -> dict:
    """``atol``/``rtol`` for ``torch.testing.assert_close``.

    Args:
        dtype, n, depth: as in :func:`rounding`.
        scale: magnitude of the terms (the compared tensor's typical size; pass its max abs when
            the values can cancel to ~0, e.g. gradients).

    Returns:
        ``dict(atol=..., rtol=...)``, to splat into ``assert_close``.
    """
    r = rounding(dtype, n=n, depth=depth)
    return dict(atol=r * scale, rtol=r)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **op) -> None:
    """``torch.testing.assert_close`` with :func:`tol` for the op (``n``, ``depth``, ``scale``).

    ``dtype`` defaults to the lower precision of the two tensors; pass ``scale="max"`` to take the
    expected tensor's max abs.
    """
    if dtype is None:
        dtype = max((actual.dtype, expected.dtype), key=lambda d: torch.finfo(d).eps)
    if op.get("scale") == "max":
        op["scale"] = max(float(expected.detach().abs().max()), torch.finfo(dtype).tiny)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype, **op))
