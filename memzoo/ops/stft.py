"""NAMM's token features: attention spectrogram, EMA over frames, online moments, age embedding.

Per cached token (and layer, KV head) the *signal* is the column of attention probabilities it
received from the queries, in stream order (zero before the token arrived, and before the stream
starts). Frames are aligned to the stream: frame m >= 1 covers the queries
``[HOP*m - N_FFT, HOP*m)``, so consecutive frames overlap by ``N_FFT - HOP = 16`` queries (the "last
16 values of the previous step" that NAMM prepends). A NAMM step at stream position P folds every
frame completed since the previous step (all m <= P // HOP) into an exponential moving average of
the frames' STFT magnitudes. Because frames follow the stream, not the calls, the features depend
only on the stream, whatever the eviction rhythm (a rhythm that is a multiple of HOP, like the
default 512, consumes exactly ``evict_every / HOP`` frames per step).

Batched form (what ``memzoo.memories.namm`` runs): a per-slot buffer of the columns not yet folded,
:func:`spectral_step` at each eviction. Naive form (:func:`naive_spectral_ema`): one token's whole
column, an explicit DFT per frame and the EMA recurrence, as written in the paper. A test holds
them together.

Legend (see ``memzoo.interface``) plus: f frequencies (``N_FREQ`` = 17), r frames, w buffered
signal columns (queries).

Reference: Cetin et al., "An Evolved Universal Transformer Memory" (arXiv 2410.13166): attention
spectrogram, EMA reduction, online normalisation, positional features.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "N_FFT",
    "HOP",
    "N_FREQ",
    "EMA_COEFF",
    "AGE_DIM",
    "spectrogram",
    "ema_over_frames",
    "spectral_step",
    "moments",
    "merge_moments",
    "age_embedding",
    "naive_spectral_ema",
]

N_FFT = 32  # STFT window (queries)
HOP = 16  # STFT hop (queries): one frame per 16 stream tokens
N_FREQ = N_FFT // 2 + 1  # onesided frequencies: 17
EMA_COEFF = 0.99  # EMA coefficient per token; per frame it is EMA_COEFF ** HOP
AGE_DIM = 8  # sin/cos features of a token's age


@functools.lru_cache(maxsize=8)
def _dft_filters(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[2 * N_FREQ, 1, N_FFT]``: the periodic Hann window times the onesided DFT's real, then imaginary, rows."""
    n = torch.arange(N_FFT, dtype=torch.float64)[None, :]
    f = torch.arange(N_FREQ, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * f * n / N_FFT
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)[None, :]
    return torch.cat([window * torch.cos(angle), -window * torch.sin(angle)])[:, None, :].to(device=device, dtype=dtype)


def spectrogram(signal: Tensor) -> Tensor:
    """STFT magnitudes of attention columns.

    The numbers of ``torch.stft(n_fft=32, hop_length=16, window=hann_window(32, periodic=True),
    center=False, onesided=True).abs()``, computed as one strided convolution with the 34 windowed
    DFT filters (17 frequencies, real and imaginary) and ``hypot``: for 32-sample frames that is
    faster than FFTs plus a complex ``abs``, which took most of NAMM's time (``recipes/bench_namm.py``
    splits NAMM's time by step).

    Args:
        signal: [..., w] columns, w = HOP * (r + 1) for r >= 1 frames.

    Returns:
        [..., f, r] magnitudes (fp32, or fp64 for an fp64 signal).
    """
    dtype = torch.promote_types(signal.dtype, torch.float32)
    w = signal.shape[-1]
    z = F.conv1d(signal.reshape(-1, 1, w).to(dtype), _dft_filters(signal.device, dtype), stride=HOP)  # [(...), 2f, r]
    mags = torch.hypot(z[:, :N_FREQ], z[:, N_FREQ:])
    return mags.reshape(*signal.shape[:-1], N_FREQ, mags.shape[-1])


def ema_over_frames(ema: Tensor, mags: Tensor, coeff: float = EMA_COEFF) -> Tensor:
    """Fold r new frames into an EMA: ``e <- a e + (1 - a) x_j`` for each frame j, with a = coeff ** HOP.

    Args:
        ema: [..., f] the EMA before the frames.
        mags: [..., f, r] the frames, oldest first.
        coeff: EMA coefficient per token.

    Returns:
        [..., f]; the old value is scaled by ``coeff ** (HOP * r)`` (= ``coeff ** n_new`` per step).
    """
    r = mags.shape[-1]
    a = coeff**HOP
    weights = (1 - a) * a ** torch.arange(r - 1, -1, -1, device=mags.device, dtype=torch.float64)  # [r], newest = 1 - a
    return ema * a**r + mags @ weights.to(mags.dtype)


def spectral_step(signal: Tensor, ema: Tensor, n_cols: int) -> tuple[Tensor, Tensor, int]:
    """One NAMM step: fold the frames complete in a column buffer into the EMA, keep the rest.

    Args:
        signal: [..., w] buffered columns; column 0 is a stream position that is a multiple of HOP
            (``-HOP`` for a new stream, whose first 16 columns are the zeros before it starts).
        ema: [..., f].
        n_cols: columns filled so far (the stream position minus column 0's position).

    Returns:
        the new EMA [..., f], the buffer with the folded columns dropped (shifted to column 0,
        zero-filled; the last ``N_FFT - HOP`` columns of the last frame stay, as they start the
        next frame), and how many columns were dropped (a multiple of HOP, 0 if no frame was complete).
    """
    r = n_cols // HOP - 1  # frames whose N_FFT columns are all in the buffer
    if r < 1:
        return ema, signal, 0
    ema = ema_over_frames(ema, spectrogram(signal[..., : HOP * (r + 1)]))
    dropped = HOP * r
    shifted = torch.zeros_like(signal)
    shifted[..., : n_cols - dropped] = signal[..., dropped:n_cols]
    return ema, shifted, dropped


def moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row mean and (biased) variance of the features of the masked tokens.

    Args:
        x: [b, ..., f] features.
        mask: [b, ...] bool, True for the tokens that count.

    Returns:
        mean [b, f], var [b, f], count [b] (fp32).
    """
    x, m = x.float().flatten(1, -2), mask.flatten(1).float()[..., None]  # [b, t, f], [b, t, 1]
    count = m.sum(1)  # [b, 1]
    mean = (x * m).sum(1) / count.clamp_min(1)
    var = ((x - mean[:, None]) ** 2 * m).sum(1) / count.clamp_min(1)
    return mean, var, count[:, 0]


def merge_moments(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the union of two sets of samples (Chan et al.'s parallel update).

    Args:
        a, b: (mean [b, f], var [b, f], count [b]) each.

    Returns:
        (mean, var, count) of both together; an empty side (count 0) leaves the other unchanged.
    """
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    n = n_a + n_b
    w_b = (n_b / n.clamp_min(1))[:, None]  # share of b
    delta = mean_b - mean_a
    mean = mean_a + delta * w_b
    var = var_a * (1 - w_b) + var_b * w_b + delta**2 * w_b * (1 - w_b)
    return mean, var, n


def age_embedding(age: Tensor) -> Tensor:
    """Transformer-style sinusoidal features of a token's age (stream tokens since it arrived).

    Args:
        age: [...] ages (>= 1 for cached tokens at a NAMM step).

    Returns:
        [..., AGE_DIM]: ``sin(age * w_i)`` then ``cos(age * w_i)``, ``w_i = 10000 ** (-2 i / AGE_DIM)``.
    """
    inv_freq = 10000.0 ** (-torch.arange(0, AGE_DIM, 2, device=age.device, dtype=torch.float32) / AGE_DIM)  # [AGE_DIM / 2]
    angles = age.float()[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def naive_spectral_ema(column: Tensor, position: int, coeff: float = EMA_COEFF) -> Tensor:
    """Reference: one token's EMA of STFT magnitudes after a NAMM step at ``position``.

    Args:
        column: [n] the attention the token received from queries 0..n-1 (n >= position; zero
            before the token arrived).
        position: the stream position of the step; frames m = 1 .. position // HOP are folded.
        coeff: EMA coefficient per token.

    Returns:
        [f] float64.
    """
    x = torch.cat([torch.zeros(N_FFT - HOP, dtype=torch.float64), column.double()])  # queries -16 .. n-1
    n_idx = torch.arange(N_FFT, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n_idx / N_FFT)  # periodic Hann window
    angle = 2 * math.pi * torch.arange(N_FREQ, dtype=torch.float64)[:, None] * n_idx / N_FFT  # [f, N_FFT]: the DFT
    a = coeff**HOP
    ema = torch.zeros(N_FREQ, dtype=torch.float64)
    for m in range(1, position // HOP + 1):
        frame = hann * x[HOP * m - HOP : HOP * m + N_FFT - HOP]  # queries [HOP m - N_FFT, HOP m)
        mags = torch.sqrt((angle.cos() @ frame) ** 2 + (angle.sin() @ frame) ** 2)  # |sum_n frame[n] e^{-2 pi i k n / N_FFT}|
        ema = a * ema + (1 - a) * mags
    return ema
