"""Titans: a neural long-term memory learned at test time, in its four placements.

``titans-lmm`` (the memory alone), ``titans-mac`` (memory as context), ``titans-mag`` (memory as
gate), ``titans-mal`` (memory as layer). One shared :class:`NeuralMemory`; the maths lives in
:mod:`memzoo.ops.titans`.

The neural memory (section 3.1 and 4.4 of the paper). Per head, an MLP ``M`` (default 2 layers,
expansion 4, residual + norm) is trained *while reading* to map keys to values: each token takes
one gradient step on ``||M(k_t) - v_t||^2`` with momentum ("surprise") and forgetting::

    q, k, v = SiLU(conv4(W_{Q,K,V} x))                       per head, q and k l2-normalised
    eta_t   = max_momentum * sigmoid(w_eta . x_t + b_eta)    momentum decay, per token and head
    theta_t = max_lr * sigmoid(w_theta . x_t + b_theta)      inner learning rate
    alpha_t = sigmoid(w_alpha . x_t + b_alpha)               forgetting (weight decay)

(each gate is a ``Linear(d -> h)`` of the token that writes; the biases start at ``momentum_init``,
``lr_init`` and ``forget_init``, the first two relative to their caps ``max_momentum`` and
``max_lr``). The initial weights ``M_0`` are parameters (the outer loop learns them); the outer
loss back-propagates through every inner update unless ``stop_inner_grad``.

Chunks and split invariance. Gradients are taken at the start of each chunk of ``chunk_size``
stream tokens (the paper's mini-batch form); token t reads the memory after its own write, with
the per-token weights of the mini-batch definition (see :mod:`memzoo.ops.titans`). Chunk
boundaries are counted in stream positions (the memory's own stream for MAL, which starts with
the persistent tokens): the state keeps the memory at the last chunk boundary plus the unfinished
chunk's keys, values and gates, and a call that continues an unfinished chunk feeds them again.
The depthwise conv takes its left context from the state. So a token's output never depends on
how the stream is cut into calls, and token-by-token decoding is exactly the training
computation (exactly so in fp64; in fp32 different cuts round differently, and the memory's
dynamics amplify that, e.g. to ~1e-4 on the logits of a 2-layer ``titans-mag`` after 1500
tokens). Every buffer has a fixed capacity and is written out of place: ``nbytes`` is constant
and the caller's state is never modified.

Placements (section 4):

* ``titans-mac`` (eqs. 21-25): the stream is cut into segments of ``segment_len`` tokens. Each
  token's query reads the memory *as it was at the segment's start*, ``h_j = M*(q_j)``; softmax
  attention of the segment over ``[persistent | h | segment]``, where token i sees every
  persistent token, ``h_j`` for ``j <= i`` and segment tokens ``j <= i`` (never a read made with
  a later token's query); the attention output ``y``, added to the segment's input ``x``
  (``write_input``), writes the memory (as ``RMSNorm(x + y)``, ``write_norm``), and the output is
  ``y * 2 sigmoid(RMSNorm(M*(x + y)))`` (the paper's ``y (x) M*(y)`` as a gate, ``output``; read
  after each token's write), then a projection. RoPE positions are
  segment-local: persistent 0..N_p-1, h at N_p + j, the segment at N_p + s + j.
* ``titans-mag`` (eqs. 26-28): sliding-window attention over ``[persistent | x]`` (the persistent
  tokens stay visible to every token, as the paper's prefix mask) gated with the memory's read of
  ``x``: ``out = W_O(RMSNorm(y) * sigmoid(RMSNorm(M(x))))`` (the paper normalises both branches
  with learnable vector weights and applies a non-linearity; sigmoid makes it a gate).
* ``titans-mal`` (eqs. 29-31): ``y = M([persistent | x])`` (the persistent tokens open the memory's
  stream: they are written and read first), then sliding-window attention over ``y`` with the
  persistent tokens' reads kept visible as a prefix.
* ``titans-lmm``: the memory alone, ``out = W_O(M(x))``.

Sliding-window positions (MAG, MAL): the stream is cut into blocks of ``window`` tokens; a block's
queries attend over the previous and the current block (masked to the ``window`` most recent
tokens) at block-local positions N_p + slot, the prefix at 0..N_p-1, so no position ever exceeds
``N_p + 2 * window``.

Reference: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryConfig, MemoryModule, MemoryState
from ..model import RMSNorm
from ..ops.attention import attend, causal_mask
from ..ops.conv import causal_conv, check_kernel, identity_plus
from ..ops.rope import apply_rope
from ..ops.titans import at_least_fp32, memory_read, mlp_shapes, titans_chunked
from ..registry import register
from ..validation import bounds

__all__ = [
    "TitansConfig",
    "TitansMACConfig",
    "TitansWindowConfig",
    "TitansMAGConfig",
    "TitansMALConfig",
    "NeuralMemoryState",
    "WindowState",
    "TitansMACState",
    "TitansMAGState",
    "TitansMALState",
    "NeuralMemory",
    "TitansLMM",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
]


# ---------------------------------------------------------------------------------- config
@dataclass
class TitansConfig(MemoryConfig):
    """The neural memory's knobs, shared by the four placements (alone, it is ``titans-lmm``).

    Attributes:
        chunk_size: c, tokens per mini-batch of the inner gradient descent (the paper's b):
            gradients are taken at the chunk's start. 16 by default; 1 is the exact online rule.
        memory_depth: L_M, layers of the memory MLP (1 = the linear memory ``W k``; the paper finds
            deeper memories better and uses 2 by default).
        memory_expansion: hidden width of the deep memory, in multiples of the head dim.
        conv_kernel: taps of the depthwise causal conv after the q/k/v projections (4, as the
            paper's "1D depthwise-separable convolution" following modern linear RNNs).
        conv_init: how the conv's taps start. ``"identity"`` (the default): the last tap (the
            token itself) 1, the others 0, so each token's key and value start as its own
            projection, and the taps are exempt from weight decay (decay would pull them towards a
            conv that passes nothing). ``"uniform"`` (memzoo before): ``nn.Conv1d``'s default,
            ``U(-1/sqrt(kernel), 1/sqrt(kernel))``, which at init mixes every channel with a random
            signed blend of the last ``kernel`` tokens: in the 4-fact learning check
            ``titans-mag`` and ``titans-lmm`` reached 0.06-0.23 started this way (0.06-0.08 with the
            memory knocked out), and they and ``titans-mal`` 0.22-0.39 started at the identity,
            beside the delta rule's 0.30-0.36 (``titans-mac`` too once written with ``x + y``: ``write_input``).
            The paper does not say how its conv starts.
        max_lr: upper bound of the inner learning rate, ``theta_t = max_lr * sigmoid(.)``: keeps one
            surprising token from blowing the memory up. 1.0 lets a token write as strongly as a
            full gradient step (0.1 in memzoo before: a needle's few tokens then write too weakly).
        lr_init: theta at initialisation (sets the bias of the theta gate); must lie in (0, max_lr).
        momentum_init: eta at initialisation: how long a surprise keeps writing (0.9: ~10 tokens);
            must lie in (0, max_momentum).
        max_momentum: upper bound of the momentum decay, ``eta_t = max_momentum * sigmoid(.)``.
            1.0 (the default, memzoo before) lets eta reach exactly 1 (a sigmoid saturates in fp32
            above a logit of ~17): the surprise then never decays and integrates every gradient
            into the memory without bound (a warm-started ``titans-mag`` had eta == 1 on ~9% of
            the tokens of its layers 1-2 and memories drifting to norms of 4,000-40,000). Below 1,
            ``|S| <= max(theta |grad|) / (1 - max_momentum)``.
        forget_init: alpha at initialisation. 1e-5 per token keeps 0.99999^16384 = 85% of a write
            at 16K tokens; the gate is a sigmoid of a logit near -11.5, i.e. ``exp(logit)``: the
            model moves alpha by factors (to ~1e-13, "never forget", or up to 1) at a constant
            rate in the logit. 0.001 (memzoo before) kept 8e-8 of a fact at 16K: erased by
            construction.
        stop_inner_grad: stop the outer gradient at the inner updates (the memory's writes are
            treated as constants: W_K, W_V and the gates then get no gradient from the loss). An
            ablation; the paper trains through them.
        norm_gain: a learnable gain per head and channel on the deep memory's output norm,
            ``M(x) = x + g * LN(MLP(x))`` (g starts at ``1 / sqrt(head_dim)``, so the norm's branch
            starts at unit length like the keys). Without it the norm pins ``||M(x) - x||`` at
            ``sqrt(head_dim)`` whatever the weights and values of another scale are out of reach;
            titans-pytorch gives the norm a gain too. False = the parameter-free norm.
        gate_lr_mult: learning-rate multiplier of the gates (eta, theta, alpha) and the norm gain
            (via ``optim_overrides``): a handful of scalars per head that must travel far in logit
            space (alpha from 1e-5 towards 1e-13) get a small gradient at the base rate.
        gate_weight_decay: weight decay of the same parameters. 0: decay pulls the gate logits
            (and so alpha, theta, eta) back to 0.5, the opposite of learning to keep a fact.
        output_gate: ``titans-lmm`` only: ``out = W_O(RMSNorm(M(x)) * sigmoid(W_g x))``, the output
            norm and gate of the paper's section 4.4. False = ``W_O(M(x))``.
        max_grad_norm: clip each token's inner gradient (all memory layers together) to this
            Frobenius norm before it enters the surprise (titans-pytorch has the same knob); 0 = off.
            The gates bound theta by ``max_lr`` but not the gradient itself: with large values or a
            learned norm gain above 1 one chunk's writes can outgrow M_0 many times over, and the
            outer gradient through them explodes (a warm-started ``titans-mag`` stopped on an
            infinite gradient norm). Below the bound it is the identity.
        first_order: take each chunk's inner gradients at its start weights detached, as
            first-order MAML does: the forward pass is unchanged bit for bit, and the outer
            gradient still reaches the keys, values, gates and (through the carried memory) M_0,
            but not through the inner gradient's own dependence on the weights. That path is the
            one that exploded: in a warm-started ``titans-mag`` (2,048-token streams, 128 chunks)
            each chunk multiplied layer 0's backward by ~1.45, to a gradient norm of ~1e19 at the
            first chunk; first-order, the same step's norm was 2.6. False = the paper's exact
            gradient.
    """

    chunk_size: int = field(default=16, metadata=bounds(ge=1))
    memory_depth: int = field(default=2, metadata=bounds(ge=1))
    memory_expansion: int = field(default=4, metadata=bounds(ge=1))
    conv_kernel: int = field(default=4, metadata=bounds(ge=1))
    conv_init: str = field(default="identity", metadata=bounds(choices=("identity", "uniform")))
    max_lr: float = field(default=1.0, metadata=bounds(gt=0))
    lr_init: float = field(default=0.01, metadata=bounds(gt=0))
    momentum_init: float = field(default=0.9, metadata=bounds(gt=0, lt=1))
    max_momentum: float = field(default=1.0, metadata=bounds(gt=0, le=1))
    forget_init: float = field(default=1e-5, metadata=bounds(gt=0, lt=1))
    stop_inner_grad: bool = False
    norm_gain: bool = True
    gate_lr_mult: float = field(default=10.0, metadata=bounds(ge=0))
    gate_weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    output_gate: bool = True
    max_grad_norm: float = field(default=0.0, metadata=bounds(ge=0))
    first_order: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.lr_init < self.max_lr:
            raise ValueError(f"need 0 < lr_init < max_lr, got lr_init={self.lr_init}, max_lr={self.max_lr}")
        if not self.momentum_init < self.max_momentum:
            raise ValueError(
                f"need 0 < momentum_init < max_momentum, got momentum_init={self.momentum_init}, max_momentum={self.max_momentum}"
            )

    def build_module(self, backbone, layer_idx: int) -> TitansLMM:
        return TitansLMM(backbone.d_model, backbone.n_heads, self)


@dataclass
class TitansMACConfig(TitansConfig):
    """``titans-mac``: memory as context.

    Attributes:
        segment_len: s, tokens per segment (attention's span; h is read once per segment's
            memory). A multiple of ``chunk_size`` so that segments start at chunk boundaries.
        n_persistent: N_p, learned persistent tokens in front of every segment.
        gate_init: ``output="gate"`` only: the initial weight of the gate's norm (0: the gate starts at 1).
        output: the paper's ``y (x) M*(y)``. ``"gate"``: ``y * 2 sigmoid(RMSNorm(M*(y)))``, a
            normalisation and a non-linearity as the paper describes its gates, with the norm's
            weight starting at 0 so the gate starts at exactly 1 (the local path untouched:
            a warm start behaves like its backbone); the read then gets no gradient through the
            gate until the norm's weight moves (its only other path is the ``h`` tokens).
            ``"add"`` (not the paper's, as ``titans-mag``'s): ``W_O y + W_M RMSNorm(M*(y))`` with
            ``W_M`` zero at init, so a warm start is its backbone and the read reaches the output
            directly: in the 4-fact learning check 0.33-0.36 against 0.04-0.08 knocked out on both
            seeds run, where ``"gate"`` learnt on one of the two. ``"product"``: the raw
            ``y * M*(y)`` (memzoo before; the read has ~50% negative entries, so it scrambles the
            local path).
        write_norm: write (and read) the memory with ``RMSNorm(y)`` instead of the attention output
            ``y`` itself, whose rms is ~0.01 at initialisation: values that small make the memory's
            writes, and so the gradients of W_V and the gates, vanish.
        write_input: what the memory is written and read with (eqs. 24-25). ``"residual"`` (the
            default): ``x + y``, the hidden state after the attention sub-layer in a pre-norm block
            (x the mixer's normed input), so each key and value carries its own token as well as
            what attention gathered. ``"attention"`` (memzoo before, the paper read literally): the
            attention output ``y`` alone, which at initialisation is a near-uniform blend of the
            segment: the memory's keys say nearly nothing about their token, and in the 4-fact
            learning check ``titans-mac`` stayed at its knocked-out score (0.08 / 0.06 / 0.08),
            and reached 0.22 / 0.21 / 0.24 with ``"residual"`` (on one seed of two; the other stays
            at its knocked-out score).
    """

    segment_len: int = field(default=512, metadata=bounds(ge=1))
    n_persistent: int = field(default=4, metadata=bounds(ge=0))
    output: str = field(default="gate", metadata=bounds(choices=("gate", "add", "product")))
    gate_init: float = field(default=0.0, metadata=bounds(ge=0))
    write_norm: bool = True
    write_input: str = field(default="residual", metadata=bounds(choices=("residual", "attention")))

    def __post_init__(self):
        super().__post_init__()
        if self.segment_len % self.chunk_size:
            raise ValueError(f"segment_len must be a positive multiple of chunk_size={self.chunk_size}, got {self.segment_len!r}")

    def build_module(self, backbone, layer_idx: int) -> TitansMAC:
        return TitansMAC(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@dataclass
class TitansWindowConfig(TitansConfig):
    """Knobs of the placements with sliding-window attention (MAG, MAL).

    Attributes:
        window: keys each token attends to (itself included), besides the persistent prefix.
        n_persistent: N_p, learned persistent tokens, visible to every token.
        attn_conv_kernel: taps of a short causal depthwise conv on the attention's q, k and v after
            their projection (0: none, the paper's layout), as ``full``'s ``conv_kernel``: each key
            then carries its predecessors, which multi-token key matching (associative recall)
            needs. Initialised to the identity, so a warm start from attention without it begins
            unchanged; its left context lives in the window's state. The memory's own conv
            (``conv_kernel``) is separate.
    """

    window: int = field(default=512, metadata=bounds(ge=1))
    n_persistent: int = field(default=4, metadata=bounds(ge=0))
    attn_conv_kernel: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self):
        super().__post_init__()
        check_kernel("attn_conv_kernel", self.attn_conv_kernel)


@dataclass
class TitansMAGConfig(TitansWindowConfig):
    """``titans-mag``: sliding-window attention gated by the memory.

    Attributes:
        output: the paper's ``y (x) M(x)``. ``"normed"``: ``RMSNorm(y) * sigmoid(RMSNorm(M(x)))``,
            both branches normalised, as the paper describes it; the one that learns the learning
            check's recall in 5 minutes (0.96). ``"gate"``: ``y * 2 sigmoid(RMSNorm(M(x)))`` with the
            norm's weight starting at ``gate_init``; at 0 the gate is exactly 1 (a warm start is its
            backbone's window attention) but the read then gets no gradient, a saddle (0.20 in the
            same check; 0.80 with ``gate_init=1``).
            ``"add"`` (not the paper's): ``W_O y + W_M RMSNorm(M(x))`` with ``W_M`` zero at init, so a
            warm start is its backbone's window attention exactly and the read reaches the output
            directly (as ``infini-deltanet``'s ``mix="add"``), instead of only through a gate on ``y``,
            which carries no fact the window does not hold.
        gate_init: ``output="gate"`` only: the initial weight of the gate's norm.
    """

    output: str = field(default="normed", metadata=bounds(choices=("gate", "normed", "add")))
    gate_init: float = field(default=1.0, metadata=bounds(ge=0))

    def build_module(self, backbone, layer_idx: int) -> TitansMAG:
        return TitansMAG(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@dataclass
class TitansMALConfig(TitansWindowConfig):
    """``titans-mal``: the memory as a layer before sliding-window attention."""

    def build_module(self, backbone, layer_idx: int) -> TitansMAL:
        return TitansMAL(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@register("titans-lmm")
def titans_lmm() -> TitansConfig:
    return TitansConfig()


@register("titans-mac")
def titans_mac() -> TitansMACConfig:
    return TitansMACConfig()


@register("titans-mag")
def titans_mag() -> TitansMAGConfig:
    return TitansMAGConfig()


@register("titans-mal")
def titans_mal() -> TitansMALConfig:
    return TitansMALConfig()


# ---------------------------------------------------------------------------------- states
@dataclass
class NeuralMemoryState(MemoryState):
    """The neural memory of one layer: weights at the last chunk boundary + the unfinished chunk.

    Attributes:
        weights: per memory layer ``[b, h, o, i]``, the memory after the last complete chunk (at
            stream position 0 these are placeholders: the memory is then the parameter M_0).
        momentum: the surprise S at that boundary, same shapes.
        keys: ``[b, h, c, k]`` keys of the unfinished chunk, slots ``[0, fill)``.
        values: ``[b, h, c, v]`` its values.
        gates: ``[b, h, c, 3]`` its eta, theta, alpha.
        conv: ``[b, kernel - 1, 3d]`` the last q/k/v projections before the conv (its left context).
        position: tokens written so far (of the memory's own stream).
    """

    weights: tuple
    momentum: tuple
    keys: Tensor
    values: Tensor
    gates: Tensor
    conv: Tensor
    position: int = 0

    @property
    def fill(self) -> int:
        """Tokens of the unfinished chunk held in the buffers."""
        return self.position % self.keys.shape[2]


@dataclass
class WindowState(MemoryState):
    """Sliding-window attention keys/values: the previous and the current block of ``window`` tokens.

    Attributes:
        keys: ``[b, h, 2w, k]`` un-rotated keys; slots ``[0, w)`` hold the previous block,
            ``[w, w + fill)`` the current one.
        values: ``[b, h, 2w, v]``.
        conv: ``[b, kernel - 1, 3d]`` the last q/k/v projections before the attention's conv
            (``attn_conv_kernel`` only; None otherwise).
        position: tokens seen so far.
    """

    keys: Tensor
    values: Tensor
    conv: Tensor | None = None
    position: int = 0


@dataclass
class TitansMACState(MemoryState):
    """``titans-mac`` state of one layer.

    Attributes:
        memory: the neural memory (written with the attention outputs y).
        segment_weights: per memory layer ``[b, h, o, i]``, the memory at the current segment's
            start, which every token of the segment reads h from.
        query_conv: ``[b, kernel - 1, d]`` conv context of the retrieval queries (projected from x).
        h_keys, h_values: ``[b, h, s, k]`` attention keys/values of the segment's retrieved h.
        x_keys, x_values: ``[b, h, s, k]`` attention keys/values of the segment's tokens.
        position: stream tokens seen so far.
    """

    memory: NeuralMemoryState
    segment_weights: tuple
    query_conv: Tensor
    h_keys: Tensor
    h_values: Tensor
    x_keys: Tensor
    x_values: Tensor
    position: int = 0


@dataclass
class TitansMAGState(MemoryState):
    """``titans-mag`` state: the memory (written with x) and the attention window."""

    memory: NeuralMemoryState
    window: WindowState


@dataclass
class TitansMALState(MemoryState):
    """``titans-mal`` state.

    Attributes:
        memory: the neural memory, whose stream is ``[persistent | x]``.
        window: the attention window over the memory's reads.
        prefix: ``[b, N_p, d]`` the memory's reads of the persistent tokens (the attention prefix),
            computed by the stream's first call.
    """

    memory: NeuralMemoryState
    window: WindowState
    prefix: Tensor


# ---------------------------------------------------------------------------------- memory
def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Titans' long-term memory: per head, an MLP written by surprise at test time.

    Stateless like every memzoo module: :meth:`forward` takes and returns a :class:`NeuralMemoryState`.

    Args:
        d_model: d.
        n_heads: h (key = value head dim k = d / h).
        config: :class:`TitansConfig`.

    Attributes:
        qkv: ``Linear(d -> 3d)`` the q/k/v projections, followed by ``conv`` (depthwise, ``[3d,
            kernel]`` taps) and SiLU.
        eta, theta, alpha: ``Linear(d -> h)`` the per-token gates' logits.
        init_weights: M_0, per memory layer ``[h, o, i]`` (learned by the outer loop).

    Reference: Titans (arXiv 2501.00663), section 3.1 (eqs. 11-15) and section 4.4.
    """

    #: set by :func:`memzoo.memory_off`: nothing is written (theta = alpha = 0), every read is of M_0
    memory_off: bool = False

    def __init__(self, d_model: int, n_heads: int, config: TitansConfig):
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim, self.d_model = n_heads, d_model // n_heads, d_model
        self.residual_norm = config.memory_depth >= 2
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Parameter(torch.empty(3 * d_model, config.conv_kernel))
        self.eta = nn.Linear(d_model, n_heads)
        self.theta = nn.Linear(d_model, n_heads)
        self.alpha = nn.Linear(d_model, n_heads)
        shapes = mlp_shapes(config.memory_depth, self.head_dim, config.memory_expansion)
        self.init_weights = nn.ParameterList(nn.Parameter(torch.empty(n_heads, o, i)) for o, i in shapes)
        self.norm_gain = nn.Parameter(torch.empty(n_heads, self.head_dim)) if config.norm_gain and self.residual_norm else None
        # M_0 is an initial state, not a weight matrix to shrink: no weight decay (param_groups)
        self.optim_overrides = {f"init_weights.{l}": {"weight_decay": 0.0} for l in range(len(shapes))}
        if config.conv_init == "identity":  # decay would pull the taps from the identity towards a conv that passes nothing
            self.optim_overrides["conv"] = {"weight_decay": 0.0}
        gates = {"lr_mult": config.gate_lr_mult, "weight_decay": config.gate_weight_decay}
        self.optim_overrides |= {f"{g}.{p}": dict(gates) for g in ("eta", "theta", "alpha") for p in ("weight", "bias")}
        if self.norm_gain is not None:
            self.optim_overrides["norm_gain"] = dict(gates)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Conv at the identity (or ``nn.Conv1d``'s default, ``conv_init``), M_0 ~ N(0, 1/fan_in), gate biases at
        their init values."""
        if self.config.conv_init == "identity":
            with torch.no_grad():
                self.conv.copy_(identity_plus(torch.zeros_like(self.conv)))
        else:
            bound = 1 / math.sqrt(self.config.conv_kernel)
            nn.init.uniform_(self.conv, -bound, bound)
        for w in self.init_weights:
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        if self.norm_gain is not None:
            nn.init.constant_(self.norm_gain, self.head_dim**-0.5)
        cfg = self.config
        nn.init.constant_(self.eta.bias, _logit(cfg.momentum_init / cfg.max_momentum))
        nn.init.constant_(self.theta.bias, _logit(cfg.lr_init / cfg.max_lr))
        nn.init.constant_(self.alpha.bias, _logit(cfg.forget_init))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> NeuralMemoryState:
        dtype = dtype or self.qkv.weight.dtype
        mem_dtype = torch.promote_types(dtype, torch.float32)  # memory maths never below fp32
        b, h, k, c = batch_size, self.n_heads, self.head_dim, self.config.chunk_size

        def zeros(*shape, dt=mem_dtype):
            return torch.zeros(*shape, device=device, dtype=dt)

        return NeuralMemoryState(
            weights=tuple(zeros(b, *w.shape) for w in self.init_weights),
            momentum=tuple(zeros(b, *w.shape) for w in self.init_weights),
            keys=zeros(b, h, c, k),
            values=zeros(b, h, c, k),
            gates=zeros(b, h, c, 3),
            conv=zeros(b, self.config.conv_kernel - 1, 3 * self.d_model, dt=dtype),
        )

    # -------------------------------------------------------------- projections
    def _project(self, x: Tensor, context: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """``SiLU(conv(x W^T))`` for ``rows`` of qkv; the conv's left context comes from the state.

        Args:
            x: [b, n, d]; context: [b, kernel - 1, C] the previous projections (C = rows' width).

        Returns:
            [b, n, C] and the next context.
        """
        y, context = causal_conv(F.linear(x, self.qkv.weight[rows]), context, self.conv[rows])
        return F.silu(y), context

    def queries(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """l2-normalised queries only (MAC's retrieval from x): [b, h, n, k], next conv context [b, kernel - 1, d]."""
        y, context = self._project(x, context, slice(0, self.d_model))
        return F.normalize(at_least_fp32(rearrange(y, "b n (h k) -> b h n k", h=self.n_heads)), dim=-1), context

    def _gates(self, x: Tensor) -> Tensor:
        """``[b, h, n, 3]``: eta, theta, alpha of each token (fp32: eta near 1 needs the mantissa)."""
        with torch.autocast(x.device.type, enabled=False):
            xf = at_least_fp32(x)

            def logits(lin: nn.Linear) -> Tensor:  # [b, n, h]
                return F.linear(xf, lin.weight.to(xf.dtype), lin.bias.to(xf.dtype))

            eta, theta, alpha = torch.sigmoid(logits(self.eta)), torch.sigmoid(logits(self.theta)), torch.sigmoid(logits(self.alpha))
            eta, theta = self.config.max_momentum * eta, self.config.max_lr * theta  # x 1.0 is exact: the default is unchanged
        return rearrange(torch.stack([eta, theta, alpha], dim=-1), "b n h three -> b h n three")

    def read(self, weights: tuple, q: Tensor) -> Tensor:
        """``M*(q)`` with given weights, no write: [b, h, n, v] (fp32 or more, autocast off)."""
        with torch.autocast(q.device.type, enabled=False):
            gain = None if self.norm_gain is None else at_least_fp32(self.norm_gain)[None, :, None, :]
            return memory_read(tuple(map(at_least_fp32, weights)), at_least_fp32(q), residual_norm=self.residual_norm, gain=gain)

    def current(self, state: NeuralMemoryState) -> tuple[tuple, tuple]:
        """The memory and momentum at the last chunk boundary (M_0 and 0 at the stream's start)."""
        if state.position == 0:
            b = state.keys.shape[0]
            return tuple(w.expand(b, *w.shape) for w in self.init_weights), state.momentum
        return state.weights, state.momentum

    # -------------------------------------------------------------- write + read
    def forward(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        """Write the tokens into the memory and read it with their queries (each after its own write).

        Args:
            x: [b, n, d] the tokens that write (keys, values, gates) and read (queries).
            state: from :meth:`init_state` or the previous call.

        Returns:
            reads [b, n, d] (heads concatenated) and the next state.
        """
        y, conv = self._project(x, state.conv, slice(None))
        q, k, v = rearrange(y, "b n (three h k) -> three b h n k", three=3, h=self.n_heads)
        q, k, v = F.normalize(at_least_fp32(q), dim=-1), F.normalize(at_least_fp32(k), dim=-1), at_least_fp32(v)  # memory maths in fp32
        gates = self._gates(x)
        if self.memory_off:  # the control: theta = alpha = 0, so the memory stays M_0 (S starts at 0 and stays)
            gates = gates * gates.new_tensor([1.0, 0.0, 0.0])
        f, c = state.fill, self.config.chunk_size
        if f:  # the unfinished chunk again: its gradients are taken at its start, with these tokens'
            q = torch.cat([torch.zeros_like(q[:, :, :1]).expand(-1, -1, f, -1), q], dim=2)  # its reads are discarded
            k = torch.cat([state.keys[:, :, :f].to(k.dtype), k], dim=2)
            v = torch.cat([state.values[:, :, :f].to(v.dtype), v], dim=2)
            gates = torch.cat([state.gates[:, :, :f], gates], dim=2)
        weights, momentum = self.current(state)
        reads, weights, momentum = titans_chunked(
            weights,
            momentum,
            q,
            k,
            v,
            *gates.unbind(-1),
            chunk_size=c,
            residual_norm=self.residual_norm,
            stop_grad=self.config.stop_inner_grad,
            gain=self.norm_gain,
            max_grad_norm=self.config.max_grad_norm,
            first_order=self.config.first_order,
        )
        total = k.shape[2]
        left = total % c
        keys, values, buf_gates = state.keys, state.values, state.gates
        if left:  # out-of-place writes: the caller's state stays valid (and autograd sees no in-place op)
            keys = keys.slice_scatter(k[:, :, total - left :].to(keys.dtype), dim=2, start=0, end=left)
            values = values.slice_scatter(v[:, :, total - left :].to(values.dtype), dim=2, start=0, end=left)
            buf_gates = buf_gates.slice_scatter(gates[:, :, total - left :].to(buf_gates.dtype), dim=2, start=0, end=left)
        next_state = NeuralMemoryState(
            weights=tuple(w.to(s.dtype) for w, s in zip(weights, state.weights)),
            momentum=tuple(m.to(s.dtype) for m, s in zip(momentum, state.momentum)),
            keys=keys,
            values=values,
            gates=buf_gates,
            conv=conv.to(state.conv.dtype),
            position=state.position + x.shape[1],
        )
        return rearrange(reads[:, :, f:], "b h n v -> b n (h v)").to(x.dtype), next_state


# ---------------------------------------------------------------------------------- attention
def _heads(t: Tensor, h: int) -> Tensor:
    return rearrange(t, "b n (h k) -> b h n k", h=h)


class _Projections(nn.Module):
    """Softmax attention's projections: queries from the attending tokens, keys/values from any."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)

    def queries(self, x: Tensor) -> Tensor:  # [b, n, d] -> [b, h, n, k]
        return _heads(self.q(x), self.n_heads)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [b, n, d] -> 2 x [b, h, n, k]
        k, v = self.kv(x).chunk(2, dim=-1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)


def _rope_attend(q: Tensor, q_pos: Tensor, k: Tensor, k_pos: Tensor, v: Tensor, mask: Tensor, theta: float) -> Tensor:
    """Attention with RoPE at explicit (local) positions and an explicit mask [s, t]."""
    return attend(apply_rope(q, q_pos, theta), apply_rope(k.to(q.dtype), k_pos, theta), v.to(q.dtype), causal=False, mask=mask)


class _PrefixWindowAttention(nn.Module):
    """Sliding-window softmax attention over ``[prefix | stream]``, the prefix visible to every token.

    Blocks of ``window`` stream tokens: a block's queries see the previous and current block
    (masked to the ``window`` most recent keys), at block-local RoPE positions. With
    ``conv_kernel`` the stream's q/k/v pass a short causal conv (identity + learned offset, the
    offset zero at init); the prefix's keys/values do not (they are no stream).
    """

    def __init__(self, d_model: int, n_heads: int, window: int, rope_theta: float, conv_kernel: int = 0):
        super().__init__()
        self.n_heads, self.head_dim, self.window, self.rope_theta = n_heads, d_model // n_heads, window, rope_theta
        self.proj = _Projections(d_model, n_heads)
        self.conv = nn.Parameter(torch.zeros(3 * d_model, conv_kernel)) if conv_kernel else None

    def reset_memory_parameters(self) -> None:
        """The short conv at the identity (its learned offset at 0); the model's init hook calls it."""
        if self.conv is not None:
            nn.init.zeros_(self.conv)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> WindowState:
        shape = (batch_size, self.n_heads, 2 * self.window, self.head_dim)
        def zeros(*size):
            return torch.zeros(size, device=device, dtype=dtype)

        conv = None if self.conv is None else zeros(batch_size, self.conv.shape[1] - 1, self.conv.shape[0])
        return WindowState(keys=zeros(*shape), values=zeros(*shape), conv=conv)

    def forward(self, x: Tensor, prefix: Tensor, state: WindowState) -> tuple[Tensor, WindowState]:
        """x: [b, n, d]; prefix: [b or 1, N_p, d] -> heads concatenated [b, n, d], next state."""
        b, n, W = x.shape[0], x.shape[1], self.window
        conv = state.conv
        if self.conv is None:
            q = self.proj.queries(x)
            k, v = self.proj.keys_values(x)
        else:
            p, conv = causal_conv(torch.cat([self.proj.q(x), self.proj.kv(x)], dim=-1), state.conv, identity_plus(self.conv))
            q, k, v = (_heads(t, self.n_heads) for t in p.chunk(3, dim=-1))
            conv = conv.to(state.conv.dtype)
        kp, vp = (t.expand(b, -1, -1, -1) for t in self.proj.keys_values(prefix))  # [b, h, N_p, k]
        n_p = kp.shape[2]
        outs, start = [], 0
        keys, values, pos = state.keys, state.values, state.position
        while start < n:
            off = pos % W
            end = min(n, start + W - off)
            m = end - start
            if off == 0 and pos > 0:  # a new block: the current one becomes the previous one
                keys = torch.cat([keys[:, :, W:], torch.zeros_like(keys[:, :, W:])], dim=2)
                values = torch.cat([values[:, :, W:], torch.zeros_like(values[:, :, W:])], dim=2)
            keys = keys.slice_scatter(k[:, :, start:end].to(keys.dtype), dim=2, start=W + off, end=W + off + m)
            values = values.slice_scatter(v[:, :, start:end].to(values.dtype), dim=2, start=W + off, end=W + off + m)
            t = W + off + m
            mask = causal_mask(m, t, window=W, device=x.device)  # [m, t]
            if pos - off == 0:  # the stream's first block has no previous block
                mask = mask & (torch.arange(t, device=x.device) >= W)
            mask = torch.cat([mask.new_ones(m, n_p), mask], dim=1)
            slots = torch.arange(t, device=x.device)
            out = _rope_attend(
                q[:, :, start:end],
                n_p + slots[W + off :],
                torch.cat([kp.to(keys.dtype), keys[:, :, :t]], dim=2),
                torch.cat([torch.arange(n_p, device=x.device), n_p + slots]),
                torch.cat([vp.to(values.dtype), values[:, :, :t]], dim=2),
                mask,
                self.rope_theta,
            )
            outs.append(out)
            pos += m
            start = end
        y = rearrange(torch.cat(outs, dim=2), "b h n k -> b n (h k)")
        return y, WindowState(keys=keys, values=values, conv=conv, position=pos)


# ---------------------------------------------------------------------------------- placements
_TITANS_OFF = "the neural memory is never written (theta = alpha = 0): every token reads the initial memory M_0"


class TitansLMM(MemoryModule):
    """``titans-lmm``: the neural memory alone, ``out = W_O(RMSNorm(M(x)) * sigmoid(W_g x))``
    (``output_gate``; without it ``W_O(M(x))``).

    Reference: Titans (arXiv 2501.00663), section 3 (LMM in the experiments) and section 4.4
    (output normalisation and gating).
    """

    def __init__(self, d_model: int, n_heads: int, config: TitansConfig):
        super().__init__()
        self.config = config
        self.memory = NeuralMemory(d_model, n_heads, config)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = RMSNorm(d_model) if config.output_gate else None
        self.out_gate = nn.Linear(d_model, d_model) if config.output_gate else None

    @property
    def memory_off_means(self) -> str:
        return _TITANS_OFF

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> NeuralMemoryState:
        return self.memory.init_state(batch_size, device=self._default_device(device), dtype=dtype)

    def forward(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        r, state = self.memory(x, state)
        if self.out_gate is not None:
            r = self.out_norm(r) * torch.sigmoid(self.out_gate(x))
        return self.out(r), state


class _WithPersistent(MemoryModule):
    """Shared bits of the placements with persistent tokens."""

    @property
    def memory_off_means(self) -> str:
        return _TITANS_OFF

    def __init__(self, d_model: int, n_heads: int, config):
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.memory = NeuralMemory(d_model, n_heads, config)
        self.persistent = nn.Parameter(torch.empty(config.n_persistent, d_model))
        self.out = nn.Linear(d_model, d_model, bias=False)
        # learned tokens like embeddings: no weight decay (param_groups)
        self.optim_overrides = {"persistent": {"weight_decay": 0.0}}
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Persistent tokens ~ N(0, 1): the scale of the normed hidden states they sit beside."""
        nn.init.normal_(self.persistent, std=1.0)

    def weights_from_attention(self, attention: dict[str, Tensor]) -> dict[str, Tensor]:
        """The softmax branch starts as the trained attention (queries, keys/values, output)."""
        d = attention["out.weight"].shape[0]
        q, kv = attention["qkv.weight"][:d], attention["qkv.weight"][d:]
        prefix = "attn." if isinstance(self.attn, _Projections) else "attn.proj."
        output = "attn_out.weight" if hasattr(self, "attn_out") else "out.weight"
        return {prefix + "q.weight": q, prefix + "kv.weight": kv, output: attention["out.weight"]}

    def persistent_tokens(self, dtype: torch.dtype) -> Tensor:
        """[1, N_p, d] the persistent tokens, as a fresh copy: they are the *input* of Linears, and
        MKL rounds differently for an input that is not 64-byte aligned, which a parameter loaded
        from safetensors may not be (a reloaded model must give bit-identical outputs)."""
        return self.persistent[None].to(dtype, copy=True)


class TitansMAC(_WithPersistent):
    """``titans-mac``: memory as context (see the module docstring for the data flow).

    Reference: Titans (arXiv 2501.00663), section 4.1, eqs. 21-25 and figure 2.
    """

    def __init__(self, d_model: int, n_heads: int, config: TitansMACConfig, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, config)
        self.segment_len, self.rope_theta = config.segment_len, rope_theta
        self.attn = _Projections(d_model, n_heads)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.write_norm = RMSNorm(d_model) if config.write_norm else None
        self.read_norm = RMSNorm(d_model) if config.output in ("gate", "add") else None
        self.memory_out = nn.Linear(d_model, d_model, bias=False) if config.output == "add" else None
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Persistent tokens ~ N(0, 1); the output gate's norm weight ``gate_init`` (0 by default: the gate starts at
        exactly 1), or with ``output="add"`` the read's projection W_M at 0."""
        super().reset_memory_parameters()
        if not hasattr(self, "memory_out"):  # the parent's __init__ runs this before the layers exist
            return
        if self.config.output == "gate":
            nn.init.constant_(self.read_norm.weight, self.config.gate_init)
        elif self.memory_out is not None:
            nn.init.zeros_(self.memory_out.weight)

    def weights_from_attention(self, attention: dict[str, Tensor]) -> dict[str, Tensor]:
        """As the other placements, and W_O = I: with the gate at 1 (or the read's projection at 0) the warm start
        is the backbone's attention (plus the persistent tokens and memory reads it attends to)."""
        weights = super().weights_from_attention(attention)
        if self.read_norm is not None:
            weights["out.weight"] = torch.eye(self.out.weight.shape[0], dtype=self.out.weight.dtype)
        return weights

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TitansMACState:
        device = self._default_device(device)
        dtype = dtype or self.out.weight.dtype
        memory = self.memory.init_state(batch_size, device=device, dtype=dtype)
        buf = (batch_size, self.n_heads, self.segment_len, self.head_dim)
        return TitansMACState(
            memory=memory,
            segment_weights=tuple(torch.zeros_like(w) for w in memory.weights),
            query_conv=torch.zeros(batch_size, self.config.conv_kernel - 1, self.memory.d_model, device=device, dtype=dtype),
            h_keys=torch.zeros(buf, device=device, dtype=dtype),
            h_values=torch.zeros(buf, device=device, dtype=dtype),
            x_keys=torch.zeros(buf, device=device, dtype=dtype),
            x_values=torch.zeros(buf, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: TitansMACState) -> tuple[Tensor, TitansMACState]:
        outs, start, n = [], 0, x.shape[1]
        while start < n:  # cut the call at the stream's segment boundaries
            end = min(n, start + self.segment_len - state.position % self.segment_len)
            out, state = self._piece(x[:, start:end], state)
            outs.append(out)
            start = end
        return torch.cat(outs, dim=1), state

    def _piece(self, x: Tensor, state: TitansMACState) -> tuple[Tensor, TitansMACState]:
        """Tokens [b, m, d] of one segment (possibly continuing it)."""
        S, n_p, m = self.segment_len, self.config.n_persistent, x.shape[1]
        off = state.position % S
        if off == 0:  # a new segment: freeze the memory as it is now (a chunk boundary) for h
            current = self.memory.current(state.memory)[0]
            # a copy: a tensor shared with memory.weights would be counted once by nbytes
            seg_weights = tuple(w.to(s.dtype, copy=True) for w, s in zip(current, state.segment_weights))
        else:
            seg_weights = state.segment_weights
        # h_j = M*(q_j), read from the segment-start memory without writing (eq. 21)
        qh, query_conv = self.memory.queries(x, state.query_conv)
        h = self.memory.read(seg_weights, qh)
        h = rearrange(h, "b h m v -> b m (h v)").to(x.dtype)
        # attention over [persistent | h | segment] (eqs. 22-23), causal in both h and the segment
        q = self.attn.queries(x)
        kx, vx = self.attn.keys_values(x)
        kh, vh = self.attn.keys_values(h)
        kp, vp = (t.expand(x.shape[0], -1, -1, -1) for t in self.attn.keys_values(self.persistent_tokens(x.dtype)))
        sl = dict(dim=2, start=off, end=off + m)
        x_keys = state.x_keys.slice_scatter(kx.to(state.x_keys.dtype), **sl)
        x_values = state.x_values.slice_scatter(vx.to(state.x_values.dtype), **sl)
        h_keys = state.h_keys.slice_scatter(kh.to(state.h_keys.dtype), **sl)
        h_values = state.h_values.slice_scatter(vh.to(state.h_values.dtype), **sl)
        t = off + m
        slots = torch.arange(t, device=x.device)
        seen = slots[None, :] <= (off + torch.arange(m, device=x.device))[:, None]  # [m, t]: slot j <= token i
        mask = torch.cat([seen.new_ones(m, n_p), seen, seen], dim=1)
        y = _rope_attend(
            q,
            n_p + S + off + torch.arange(m, device=x.device),
            torch.cat([kp.to(x_keys.dtype), h_keys[:, :, :t], x_keys[:, :, :t]], dim=2),
            torch.cat([torch.arange(n_p, device=x.device), n_p + slots, n_p + S + slots]),
            torch.cat([vp.to(x_values.dtype), h_values[:, :, :t], x_values[:, :, :t]], dim=2),
            mask,
            self.rope_theta,
        )
        y = self.attn_out(rearrange(y, "b h m k -> b m (h k)"))
        # write the memory with y (write_input: x + y by default), then read it with the same (eqs. 24-25): out = y (x) M*(.)
        w = x + y if self.config.write_input == "residual" else y
        r, memory = self.memory(self.write_norm(w) if self.write_norm is not None else w, state.memory)
        next_state = TitansMACState(
            memory=memory,
            segment_weights=seg_weights,
            query_conv=query_conv.to(state.query_conv.dtype),
            h_keys=h_keys,
            h_values=h_values,
            x_keys=x_keys,
            x_values=x_values,
            position=state.position + m,
        )
        if self.memory_out is not None:
            return self.out(y) + self.memory_out(self.read_norm(r)), next_state
        gate = 2 * torch.sigmoid(self.read_norm(r)) if self.read_norm is not None else r
        return self.out(y * gate), next_state


class TitansMAG(_WithPersistent):
    """``titans-mag``: sliding-window attention over ``[persistent | x]`` gated by ``M(x)``.

    Reference: Titans (arXiv 2501.00663), section 4.2, eqs. 26-28 and figure 3.
    """

    def __init__(self, d_model: int, n_heads: int, config: TitansMAGConfig, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, config)
        self.attn = _PrefixWindowAttention(d_model, n_heads, config.window, rope_theta, config.attn_conv_kernel)
        self.attn_norm = RMSNorm(d_model) if config.output == "normed" else None
        self.memory_norm = RMSNorm(d_model)
        self.memory_out = nn.Linear(d_model, d_model, bias=False) if config.output == "add" else None
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Persistent tokens ~ N(0, 1); with ``output="gate"`` the gate's norm weight ``gate_init`` (at 0 the gate
        starts at 1); with ``output="add"`` the read's projection W_M at 0."""
        super().reset_memory_parameters()
        if not hasattr(self, "memory_out"):  # the parent's __init__ runs this before the layers exist
            return
        if self.config.output == "gate":
            nn.init.constant_(self.memory_norm.weight, self.config.gate_init)
        elif self.memory_out is not None:
            nn.init.zeros_(self.memory_out.weight)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TitansMAGState:
        device = self._default_device(device)
        dtype = dtype or self.out.weight.dtype
        return TitansMAGState(
            memory=self.memory.init_state(batch_size, device=device, dtype=dtype),
            window=self.attn.init_state(batch_size, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: TitansMAGState) -> tuple[Tensor, TitansMAGState]:
        r, memory = self.memory(x, state.memory)
        y, window = self.attn(x, self.persistent_tokens(x.dtype), state.window)
        if self.memory_out is not None:
            out = self.out(y) + self.memory_out(self.memory_norm(r))
        elif self.attn_norm is None:
            out = self.out(y * 2 * torch.sigmoid(self.memory_norm(r)))
        else:
            out = self.out(self.attn_norm(y) * torch.sigmoid(self.memory_norm(r)))
        return out, TitansMAGState(memory=memory, window=window)


class TitansMAL(_WithPersistent):
    """``titans-mal``: ``y = M([persistent | x])``, then sliding-window attention over y.

    Reference: Titans (arXiv 2501.00663), section 4.3, eqs. 29-31.
    """

    def __init__(self, d_model: int, n_heads: int, config: TitansMALConfig, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, config)
        self.attn = _PrefixWindowAttention(d_model, n_heads, config.window, rope_theta, config.attn_conv_kernel)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TitansMALState:
        device = self._default_device(device)
        dtype = dtype or self.out.weight.dtype
        return TitansMALState(
            memory=self.memory.init_state(batch_size, device=device, dtype=dtype),
            window=self.attn.init_state(batch_size, device=device, dtype=dtype),
            prefix=torch.zeros(batch_size, self.config.n_persistent, self.memory.d_model, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: TitansMALState) -> tuple[Tensor, TitansMALState]:
        n_p = self.config.n_persistent
        first = state.memory.position == 0
        if first:  # the persistent tokens open the memory's stream (eq. 29)
            x = torch.cat([self.persistent_tokens(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        r, memory = self.memory(x, state.memory)
        prefix = r[:, :n_p] if first else state.prefix.to(r.dtype)
        y, window = self.attn(r[:, n_p:] if first else r, prefix, state.window)
        next_state = TitansMALState(memory=memory, window=window, prefix=prefix.to(state.prefix.dtype))
        return self.out(y), next_state
