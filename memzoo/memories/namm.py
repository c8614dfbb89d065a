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

Two documented options, both off by default (the paper's NAMM):

- ``key_redundancy=True`` adds a 26th feature, each token's *key redundancy*: the largest cosine
  similarity between its key and the key of any newer token the head still caches
  (:func:`key_redundancy`). The paper's features describe the attention a token *received*; on a
  repeated filler they barely tell a needle from the filler around it (``recipes/namm_feature_probe.py``:
  a logistic probe on them separates the two at AUC 0.77-0.84 per head, at the step that would
  evict them; 0.81-0.95 with this feature), while a repeated sentence's tokens have a newer copy
  with the same key and a unique sentence's do not. It is the measurable
  form of NAMM's own argument for backward attention ("repeated content keeps only its latest
  copy"). Keys are cached un-rotated in memzoo models, so equal content at other positions has
  equal keys; in ``memzoo.hf`` the keys are the host model's rotated ones and the feature is weaker.
- ``n_recent=N`` always keeps the N most recent stream tokens (like ``h2o``'s window), so the
  local context never depends on the scorer.

Legend (see ``memzoo.interface``) plus: f features or frequencies, e BAM head width (32).

Reference: Cetin et al., "An Evolved Universal Transformer Memory" (arXiv 2410.13166): the
attention-spectrogram features, the BAM scorer with its backward mask, CMA-ES training.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryState
from ..ops.attention import attend
from ..ops.stft import AGE_DIM, HOP, N_FREQ, age_embedding, merge_moments, moments, spectral_step
from ..registry import register
from ..validation import bounds
from .kv import EvictionPolicy, KVCacheState, KVConfig, protect_recent

__all__ = [
    "NAMMConfig",
    "NAMMState",
    "NAMMPolicy",
    "BAMScorer",
    "N_FEATURES",
    "key_redundancy",
    "key_redundancy_naive",
    "namm_parameters",
    "set_namm_parameters",
    "namm_parameter_count",
    "redundancy_rule",
    "load_namm_parameters",
    "save_namm_parameters",
]

N_FEATURES = AGE_DIM + N_FREQ  # 25 features per token
D_ATTN = 32  # width of the BAM attention head
NORM_EPS = 1e-6  # floor of the running std (a feature constant so far must not blow up)


# ---------------------------------------------------------------------------------- key redundancy
def key_redundancy(keys: Tensor, valid: Tensor, token_pos: Tensor) -> Tensor:
    """Each cached token's largest key cosine similarity with a newer cached token of the same head.

    A token of a repeated sentence has a newer copy with (nearly) the same key and scores ~1; a
    token whose content the stream never repeated scores lower. -1 for the newest token and holes.

    Args:
        keys: [b, h, L, k] un-rotated keys.
        valid: [b, h, L] bool.
        token_pos: [b, h, L] stream positions.

    Returns:
        [b, h, L] fp32 in [-1, 1].
    """
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn @ kn.transpose(-1, -2)  # [b, h, L, L]: token i (rows) against token j (columns)
    newer = (token_pos[..., None, :] > token_pos[..., :, None]) & valid[..., None, :] & valid[..., :, None]
    return sim.masked_fill(~newer, -1.0).amax(dim=-1)


def key_redundancy_naive(keys: Tensor, valid: Tensor, token_pos: Tensor) -> Tensor:
    """Reference for :func:`key_redundancy`: one token at a time, in fp64."""
    out = torch.full(valid.shape, -1.0, dtype=torch.float64)
    for b, h, i in valid.nonzero().tolist():
        for j in range(keys.shape[2]):
            if valid[b, h, j] and token_pos[b, h, j] > token_pos[b, h, i]:
                ki, kj = keys[b, h, i].double(), keys[b, h, j].double()
                cos = float(ki @ kj / (ki.norm() * kj.norm()).clamp_min(1e-12))
                out[b, h, i] = max(float(out[b, h, i]), cos)
    return out


# ---------------------------------------------------------------------------------- scorer
class BAMScorer(nn.Module):
    """Backward attention memory: one attention head over a head's cached tokens, then a linear score.

    Token i attends only to tokens j >= i (itself and newer ones): what came after a token is what
    tells whether it still matters. With features x [t, f] (f = 25, or 26 with key redundancy):
    ``q, k, v = x W_qkv``; ``o = softmax(q k^T / sqrt(32) + backward mask) v``;
    ``(res, mult) = o W_out``; ``x <- x * (1 + mult) + res``; ``score = x w + c``.
    Parameters (4172 for f = 25) start at zero and are evolved, never trained by gradient.

    Args:
        n_features: f.

    Reference: arXiv 2410.13166 (backward attention memory models).
    """

    def __init__(self, n_features: int = N_FEATURES):
        super().__init__()
        f = n_features
        # Plain parameters, not nn.Linear: the backbone's generic init (normal) must not touch them,
        # and its init hook runs reset_memory_parameters only on modules that own parameters.
        self.qkv_weight = nn.Parameter(torch.empty(3 * D_ATTN, f), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.empty(3 * D_ATTN), requires_grad=False)
        self.out_weight = nn.Parameter(torch.empty(2 * f, D_ATTN), requires_grad=False)
        self.out_bias = nn.Parameter(torch.empty(2 * f), requires_grad=False)
        self.head_weight = nn.Parameter(torch.empty(1, f), requires_grad=False)
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
            x: [b, t, f] features, tokens in stream order.
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
        key_redundancy: add the key-redundancy feature (:func:`key_redundancy`) as the 26th.
        n_recent: the most recent stream tokens that always stay (0: none, the paper).
    """

    needs_attention = True

    def __init__(self, evict_every: int, key_redundancy: bool = False, n_recent: int = 0):
        super().__init__()
        self.evict_every = evict_every
        self.key_redundancy, self.n_recent = key_redundancy, n_recent
        self.scorer = BAMScorer(N_FEATURES + int(key_redundancy))

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
        """The features of the cached tokens: [b, h, L, f] (age embedding, normalised EMA, then key redundancy if on)."""
        st, L = cache.policy, cache.length
        age = cache.position - cache.token_pos[:, :, :L]  # [b, h, L]
        std = st.var.sqrt().clamp_min(NORM_EPS)
        spectral = (st.ema[:, :, :L] - st.mean[:, None, None]) / std[:, None, None]
        parts = [age_embedding(age), spectral]
        if self.key_redundancy:
            parts.append(key_redundancy(cache.keys[:, :, :L], cache.valid[:, :, :L], cache.token_pos[:, :, :L])[..., None])
        return torch.cat(parts, dim=-1)

    def score(self, cache: KVCacheState) -> Tensor:
        b = cache.keys.shape[0]
        x = rearrange(self.features(cache), "b h t f -> (b h) t f")
        valid = rearrange(cache.valid[:, :, : cache.length], "b h t -> (b h) t")
        s = rearrange(self.scorer(x, valid), "(b h) t -> b h t", b=b)
        if self.n_recent:
            s = protect_recent(s, cache, self.n_recent)
        return s.masked_fill(s < 0, float("-inf"))  # score < 0: evict, even with room in the budget


# ---------------------------------------------------------------------------------- config
@dataclass
class NAMMConfig(KVConfig):
    """``namm``: an evolved scorer over attention-spectrogram features, capped at ``budget`` tokens (arXiv 2410.13166).

    Attributes:
        key_redundancy: add each token's key redundancy as a 26th feature (see the module docstring;
            off in the paper). The scorer's parameter vector grows to 4,335 entries.
        n_recent: the most recent stream tokens always stay (0 in the paper).
    """

    key_redundancy: bool = False
    n_recent: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self):
        super().__post_init__()
        if self.n_recent > self.budget:
            raise ValueError(f"n_recent must be an int in [0, budget={self.budget}], got {self.n_recent!r}")

    def make_policy(self) -> NAMMPolicy:
        return NAMMPolicy(self.evict_every, self.key_redundancy, self.n_recent)


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


def namm_parameter_count(n_features: int = N_FEATURES) -> int:
    """Entries of the flat NAMM parameter vector: 4172 for the paper's 25 features, 4335 with key redundancy."""
    return sum(p.numel() for p in BAMScorer(n_features).parameters())


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
    scorers = _scorers(obj)
    expected = sum(p.numel() for p in scorers[0].parameters())
    if vector.numel() != expected:
        raise ValueError(
            f"this NAMM's parameter vector has {expected} entries ({scorers[0].head_weight.shape[1]} features), got {vector.numel()}; "
            "a scorer evolved with key_redundancy fits only a namm built with key_redundancy=True, and the reverse"
        )
    for scorer in scorers:
        params = list(scorer.parameters())
        for p, chunk in zip(params, vector.split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


def redundancy_rule(threshold: float = 0.95) -> Tensor:
    """The scorer vector of the hand-set rule ``score = threshold - key redundancy`` (26 features).

    With every attention parameter at zero the BAM network passes the features through unchanged
    (``mult = res = 0``), so the score is the linear head alone: a token stays iff no newer cached
    token has a key closer than ``threshold`` (cosine), and under the cap the least redundant stay
    first. A starting point for evolution as much as a scorer of its own.

    Args:
        threshold: cosine similarity above which a token counts as a copy of a newer one.

    Returns:
        [namm_parameter_count(26)] fp32, for a namm built with ``key_redundancy=True``.
    """
    scorer = BAMScorer(N_FEATURES + 1)
    with torch.no_grad():
        scorer.head_weight[0, N_FEATURES] = -1.0
        scorer.head_bias.fill_(threshold)
    return torch.nn.utils.parameters_to_vector(scorer.parameters()).detach().clone()


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
