"""``namm``: Neural Attention Memory Models, an evolved network decides which cached tokens stay.

At every eviction (every ``evict_every`` stream tokens, the paper's 512), per layer and KV head,
each cached token gets 25 features: an 8-dim sin/cos embedding of its age, then the 17 STFT
magnitudes of the attention it received, averaged over time (EMA) and normalised online
(``memzoo.ops.stft``). A small *backward attention memory* (BAM) network scores the tokens; a token
stays iff its score is >= 0 (the newest always stays). memzoo adds a hard cap: at most ``budget``
tokens stay (highest scores first, ties to the most recent), so the cache is bounded even before
the scorer is trained. All scorer parameters start at zero: every score is 0, everything is kept
(within the cap), and with a budget larger than the stream an untrained NAMM is a full cache.

The scorer is evolved (CMA-ES), not trained by gradient: its parameters have
``requires_grad=False``. :func:`namm_parameters` / :func:`set_namm_parameters` read and write them
as one flat vector (:func:`namm_parameter_count` entries) on a whole memzoo model or a
``memzoo.hf.EvictingCache``; every layer holds an identical copy (one vector shared by all layers
and heads).

Split invariance: the attention columns are recorded query by query in ``observe`` (a per-slot
buffer, [b, h, C, w], bounded), and the spectrogram/EMA step runs only at eviction boundaries of
the stream, so one call, random cuts and token-by-token decoding give the same features.

Legend (see ``memzoo.interface``) plus: f features or frequencies, e BAM head width (32).

Reference: Cetin et al., "An Evolved Universal Transformer Memory" (arXiv 2410.13166): the
attention-spectrogram features, the BAM scorer with its backward mask, CMA-ES training.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryState
from ..ops.attention import attend
from ..ops.stft import AGE_DIM, HOP, N_FREQ, age_embedding, merge_moments, moments, spectral_step
from ..registry import register
from .kv import EvictionPolicy, KVCacheState, KVConfig

__all__ = [
    "NAMMConfig",
    "NAMMState",
    "NAMMPolicy",
    "BAMScorer",
    "N_FEATURES",
    "namm_parameters",
    "set_namm_parameters",
    "namm_parameter_count",
    "load_namm_parameters",
    "save_namm_parameters",
]

N_FEATURES = AGE_DIM + N_FREQ  # 25 features per token
D_ATTN = 32  # width of the BAM attention head
NORM_EPS = 1e-6  # floor of the running std (a feature constant so far must not blow up)


# ---------------------------------------------------------------------------------- scorer
class BAMScorer(nn.Module):
    """Backward attention memory: one attention head over a head's cached tokens, then a linear score.

    Token i attends only to tokens j >= i (itself and newer ones): what came after a token is what
    tells whether it still matters. With features x [t, 25]:
    ``q, k, v = x W_qkv``; ``o = softmax(q k^T / sqrt(32) + backward mask) v``;
    ``(res, mult) = o W_out``; ``x <- x * (1 + mult) + res``; ``score = x w + c``.
    Parameters (4172) start at zero and are evolved, never trained by gradient.

    Reference: arXiv 2410.13166 (backward attention memory models).
    """

    def __init__(self):
        super().__init__()
        # Plain parameters, not nn.Linear: the backbone's generic init (normal) must not touch them,
        # and its init hook runs reset_memory_parameters only on modules that own parameters.
        self.qkv_weight = nn.Parameter(torch.empty(3 * D_ATTN, N_FEATURES), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.empty(3 * D_ATTN), requires_grad=False)
        self.out_weight = nn.Parameter(torch.empty(2 * N_FEATURES, D_ATTN), requires_grad=False)
        self.out_bias = nn.Parameter(torch.empty(2 * N_FEATURES), requires_grad=False)
        self.head_weight = nn.Parameter(torch.empty(1, N_FEATURES), requires_grad=False)
        self.head_bias = nn.Parameter(torch.empty(1), requires_grad=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """All zeros: every score is 0 and everything is kept (the backbone calls this after its generic init)."""
        for p in self.parameters():
            nn.init.zeros_(p)

    def _linear(self, x: Tensor, name: str) -> Tensor:
        w, b = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
        return F.linear(x, w.float(), b.float())  # fp32 even from a bf16 checkpoint

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """Scores of one head's cached tokens.

        Args:
            x: [b, t, 25] features, tokens in stream order.
            valid: [b, t] bool; invalid tokens (holes) are neither seen nor meaningfully scored.

        Returns:
            [b, t] fp32 scores (>= 0 = keep).
        """
        x = x.float()
        q, k, v = rearrange(self._linear(x, "qkv"), "b t (three e) -> three b 1 t e", three=3)
        if bool(valid.all()):
            # backward mask = causal attention over the reversed tokens: SDPA's fast path, no [t, t] mask
            o = attend(q.flip(2), k.flip(2), v.flip(2), causal=True).flip(2)[:, 0]  # [b, t, e]
        else:
            t = x.shape[1]
            idx = torch.arange(t, device=x.device)
            # i sees the valid j >= i (and always itself, so that no row is empty)
            eye = torch.eye(t, dtype=torch.bool, device=x.device)
            sees = (idx[None, :] >= idx[:, None]) & (valid[:, None, :] | eye)  # [b, t, t]
            o = attend(q, k, v, causal=False, mask=sees[:, None])[:, 0]  # [b, t, e]
        res, mult = self._linear(o, "out").chunk(2, dim=-1)
        x = x * (1 + mult) + res
        return self._linear(x, "head")[..., 0]


# ---------------------------------------------------------------------------------- state
@dataclass
class NAMMState(MemoryState):
    """NAMM's per-layer state.

    Attributes:
        signal: [b, h, C, w] per slot, the attention its token received from the queries at stream
            positions ``base, base + 1, ...`` not yet folded into ``ema`` (zeros before it arrived).
        ema: [b, h, C, f] per slot, EMA of the token's STFT magnitudes.
        mean: [b, f] running mean of the EMA features over heads, tokens and NAMM steps.
        var: [b, f] running (biased) variance.
        count: [b] samples behind mean/var.
        base: stream position of ``signal``'s column 0 (a multiple of HOP; -HOP for a new stream).
    """

    signal: Tensor
    ema: Tensor
    mean: Tensor
    var: Tensor
    count: Tensor
    base: int = -HOP


# ---------------------------------------------------------------------------------- policy
class NAMMPolicy(EvictionPolicy):
    """The NAMM eviction policy: spectrogram features + BAM scorer, keep iff score >= 0.

    Args:
        evict_every: the eviction rhythm (sizes the column buffer: ``evict_every + 32 - gcd(evict_every, 16)``
            columns hold every column not yet folded, whatever the rhythm; ``evict_every + 16`` when it is
            a multiple of 16).
    """

    needs_attention = True

    def __init__(self, evict_every: int):
        super().__init__()
        self.evict_every = evict_every
        self.scorer = BAMScorer()

    @property
    def signal_width(self) -> int:
        return self.evict_every + 2 * HOP - math.gcd(self.evict_every, HOP)

    def init_state(self, batch_size: int, n_heads: int, capacity: int, device) -> NAMMState:
        b, h, C = batch_size, n_heads, capacity
        return NAMMState(
            signal=torch.zeros(b, h, C, self.signal_width, device=device),
            ema=torch.zeros(b, h, C, N_FREQ, device=device),
            mean=torch.zeros(b, N_FREQ, device=device),
            var=torch.zeros(b, N_FREQ, device=device),
            count=torch.zeros(b, device=device),
        )

    def observe(self, cache: KVCacheState, probs: Tensor, n_new: int) -> NAMMState:
        """Record the new queries' attention columns (probs: [b, h, n_new, T])."""
        st, T = cache.policy, probs.shape[-1]
        start = cache.position - n_new - st.base  # buffer column of the first new query
        signal = st.signal
        if start + n_new > signal.shape[-1]:  # only the hf cache, whose calls may span several periods
            signal = torch.cat([signal, signal.new_zeros(*signal.shape[:-1], start + n_new - signal.shape[-1])], dim=-1)
        else:
            signal = signal.clone()  # state in, state out
        # selection is discrete: no gradient flows through the features
        signal[:, :, :T, start : start + n_new] = rearrange(probs.detach().float(), "b h n t -> b h t n")
        return NAMMState(signal=signal, ema=st.ema, mean=st.mean, var=st.var, count=st.count, base=st.base)

    def before_eviction(self, cache: KVCacheState) -> NAMMState:
        """The NAMM step: fold the completed frames into the EMA and the running moments."""
        st = cache.policy
        ema, signal, dropped = spectral_step(st.signal, st.ema, cache.position - st.base)
        if not dropped:
            return st
        mean, var, count = merge_moments((st.mean, st.var, st.count), moments(ema, cache.valid))
        return NAMMState(signal=signal, ema=ema, mean=mean, var=var, count=count, base=st.base + dropped)

    def features(self, cache: KVCacheState) -> Tensor:
        """The 25 features of the cached tokens: [b, h, L, 25] (age embedding, then normalised EMA)."""
        st, L = cache.policy, cache.length
        age = cache.position - cache.token_pos[:, :, :L]  # [b, h, L]
        std = st.var.sqrt().clamp_min(NORM_EPS)
        spectral = (st.ema[:, :, :L] - st.mean[:, None, None]) / std[:, None, None]
        return torch.cat([age_embedding(age), spectral], dim=-1)

    def score(self, cache: KVCacheState) -> Tensor:
        b = cache.keys.shape[0]
        x = rearrange(self.features(cache), "b h t f -> (b h) t f")
        valid = rearrange(cache.valid[:, :, : cache.length], "b h t -> (b h) t")
        s = rearrange(self.scorer(x, valid), "(b h) t -> b h t", b=b)
        return s.masked_fill(s < 0, float("-inf"))  # score < 0: evict, even with room in the budget


# ---------------------------------------------------------------------------------- config
@dataclass
class NAMMConfig(KVConfig):
    """``namm``: an evolved scorer over attention-spectrogram features, capped at ``budget`` tokens (arXiv 2410.13166)."""

    def make_policy(self) -> NAMMPolicy:
        return NAMMPolicy(self.evict_every)


@register("namm")
def namm() -> NAMMConfig:
    return NAMMConfig()


# ---------------------------------------------------------------------------------- evolution interface
def _scorers(obj) -> list[BAMScorer]:
    root = obj if isinstance(obj, nn.Module) else getattr(obj, "policy", None)  # a model, or an hf EvictingCache
    scorers = [m for m in root.modules() if isinstance(m, BAMScorer)] if isinstance(root, nn.Module) else []
    if not scorers:
        raise ValueError(
            f"{type(obj).__name__} holds no NAMM scorer; use memzoo.build('namm', ...) or memzoo.hf.EvictingCache('namm', ...)"
        )
    return scorers


def namm_parameter_count() -> int:
    """Entries of the flat NAMM parameter vector (4172)."""
    return sum(p.numel() for p in BAMScorer().parameters())


def namm_parameters(obj) -> Tensor:
    """The NAMM scorer's parameters as one flat fp32 CPU vector.

    Layout: ``qkv_weight [96, 25], qkv_bias, out_weight [50, 32], out_bias, head_weight [1, 25], head_bias``,
    each flattened row-major.

    Args:
        obj: a memzoo model built with ``namm`` (or any module containing NAMM policies), or a
            ``memzoo.hf.EvictingCache('namm', ...)``.

    Raises:
        ValueError: no scorer in ``obj``, or its layers' copies differ.
    """
    vectors = [torch.nn.utils.parameters_to_vector(s.parameters()).detach().float().cpu() for s in _scorers(obj)]
    if any(not torch.equal(vectors[0], v) for v in vectors[1:]):
        raise ValueError("the layers' NAMM scorers differ; one vector is shared by all layers: set it with set_namm_parameters")
    return vectors[0].clone()


@torch.no_grad()
def set_namm_parameters(obj, vector) -> None:
    """Write a flat parameter vector (as returned by :func:`namm_parameters`) into every NAMM scorer of ``obj``.

    Args:
        obj: a memzoo ``namm`` model or a ``memzoo.hf.EvictingCache('namm', ...)``.
        vector: [namm_parameter_count()] tensor or array (e.g. a CMA-ES candidate).
    """
    vector = torch.as_tensor(vector, dtype=torch.float32).flatten()
    if vector.numel() != namm_parameter_count():
        raise ValueError(f"a NAMM parameter vector has {namm_parameter_count()} entries, got {vector.numel()}")
    for scorer in _scorers(obj):
        params = list(scorer.parameters())
        for p, chunk in zip(params, vector.split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


def save_namm_parameters(path: str | Path, vector: Tensor) -> None:
    """Save a NAMM parameter vector as safetensors (``{"namm": vector}``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"namm": torch.as_tensor(vector, dtype=torch.float32).flatten().contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_namm_parameters(path: str | Path) -> Tensor:
    """A NAMM parameter vector from a file of :func:`save_namm_parameters`, a scorer folder or a memzoo ``namm`` checkpoint.

    Args:
        path: a ``.safetensors`` file holding ``namm``; a scorer folder holding ``namm.safetensors``
            (what evolution ships, e.g. ``checkpoints/namm-scorer``); or a folder written by
            ``model.save_pretrained`` (the first layer's scorer is read).
    """
    from safetensors.torch import load_file

    path = Path(path)
    file = path
    if path.is_dir():
        file = next((path / n for n in ("namm.safetensors", "model.safetensors") if (path / n).is_file()), path / "namm.safetensors")
    if not file.is_file():
        raise FileNotFoundError(
            f"no NAMM parameters at {str(path)!r}: expected a .safetensors file, a scorer folder with namm.safetensors, "
            "or a memzoo namm checkpoint folder"
        )
    tensors = load_file(str(file))
    if "namm" in tensors:
        return tensors["namm"].float()
    names = [n for n, _ in BAMScorer().named_parameters()]
    prefixes = sorted(k[: -len(names[0])] for k in tensors if k.endswith(".scorer." + names[0]))
    if not prefixes:
        raise ValueError(f"{str(file)!r} holds no NAMM scorer (neither a 'namm' vector nor a namm model's weights)")
    first = min(prefixes, key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.split(".")])  # layer 0, not 10
    return torch.cat([tensors[first + n].float().flatten() for n in names])
