"""Titans' neural long-term memory: an MLP whose weights are learned at test time; naive and chunked.

The memory ``M`` is an MLP of depth ``L`` (one weight tensor per layer, a batch of them: one MLP
per batch row and head, ``W_l: [b, h, o, i]``)::

    M(x) = W_1 x                                       L = 1: the linear memory
    M(x) = x + g * LN(W_L silu(... silu(W_1 x)))       L >= 2: residual + norm (LN without parameters)

``g`` is the norm's gain, one per head and channel (``gain``; None = 1, the LN alone). Without it
the norm pins ``||M(x) - x||`` at ``sqrt(dim)`` whatever the weights, and values of another scale
are out of the memory's reach. It is learned by the outer loop and held fixed by the inner one.

Per token t, with keys/values/queries ``k_t, v_t, q_t: [k]`` and gates ``eta_t, theta_t, alpha_t``::

    loss      l_t(W) = ||M_W(k_t) - v_t||^2                          (eq. 12)
    surprise  S_t = eta_t S_{t-1} - theta_t grad l_t(W_{t'})         (eq. 14)
    memory    W_t = (1 - alpha_t) W_{t-1} + S_t                      (eq. 13)
    read      y_t = M_{W_t}(q_t)                                     (eq. 15, after the write)

where ``W_{t'}`` is the memory before the first token of t's chunk: the gradients of a chunk of
``c`` tokens are all taken at the chunk's start (the paper's mini-batch gradient descent, eq. 16;
``c = 1`` is the online rule of eqs. 13-14). Inside a chunk the weights still move token by token
(momentum and decay are per token), and token t reads the memory *after* its own write, which
is causal (it uses tokens <= t only).

Two forms, held together by ``tests/test_titans.py``:

* :func:`titans_naive` follows the equations token by token with explicit weight tensors, and
  takes the per-token gradients with ``torch.func`` (``vmap(grad(loss))``), independently of the
  closed form below.
* :func:`titans_chunked` is the form the modules use. Per chunk it takes the gradients at the
  chunk's start in closed form (:func:`memory_grads`: each is an outer product
  ``dz_{l,i} a_{l-1,i}^T``), solves the two linear recurrences (momentum, decay) of the chunk in
  closed form with c x c coefficient matrices (the "scan" of eqs. 17-18, done as matmuls since a
  chunk is short), and reads every token of the chunk with its own weights without materialising
  them (the dual form: ``W_t x = A_t W_0 x + B_t S_0 x + sum_i Gamma_ti (a_i . x) dz_i``). Chunks
  run in order (a chunk's gradients need the weights at its start); inside a chunk everything is
  a few batched matmuls over (b, h).

Both return the memory and momentum after the last **complete** chunk: the tokens of a trailing
partial chunk are read but not committed (their gradients must be taken at that chunk's start, so
a caller that continues the stream feeds them again; the modules keep them in their state).

Precision: an MLP trained online amplifies rounding (the norm's backward divides by the spread of
its input, and every write feeds the next gradient). In fp64 the two forms agree to ~1e-13; in fp32
both drift from the fp64 result by ~1e-5 (reads of size ~1) after a few hundred tokens and by
~1e-4 after thousands, at the tests' gates: neither form is the more exact one.

Everything is differentiable with respect to the inputs (keys, values, queries, gates, initial
weights): the outer loss back-propagates through the inner updates (``stop_grad=True`` cuts it).
Memory maths runs in fp32 (fp64 for fp64 inputs) with autocast disabled, whatever the input dtype.

Dimension letters (:mod:`memzoo.interface`): b batch, h heads, n tokens, c chunk, k key dim,
v value dim; here also o/i (output/input width of a memory layer) and g (chunks in the call).

Reference: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv
2501.00663), section 3.1 (eqs. 8-15) and section 3.2 (eqs. 16-18, chunked training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

__all__ = [
    "LN_EPS",
    "at_least_fp32",
    "mlp_shapes",
    "memory_read",
    "memory_grads",
    "clip_token_grads",
    "titans_naive",
    "titans_chunked",
]

#: epsilon of the memory's output LayerNorm
LN_EPS = 1e-5
#: floor of the per-token log gates (log eta, log(1 - alpha)): a gate of exactly 0 or 1 must not
#: turn the cumulative sums into -inf - -inf = NaN; exp(-30) ~ 1e-13 is "fully forgotten" anyway
_LOG_FLOOR = -30.0

Weights = tuple[Tensor, ...]


def mlp_shapes(depth: int, dim: int, expansion: int = 4) -> list[tuple[int, int]]:
    """``(o, i)`` of each memory layer: ``dim -> expansion*dim -> ... -> dim``.

    Args:
        depth: L >= 1 (1 = the linear memory ``dim -> dim``).
        dim: key = value dim of a head.
        expansion: hidden width multiplier of the deep memory.
    """
    if depth < 1:
        raise ValueError(f"memory depth must be >= 1, got {depth}")
    widths = [dim] + [expansion * dim] * (depth - 1) + [dim]
    return [(widths[l + 1], widths[l]) for l in range(depth)]


def at_least_fp32(t: Tensor) -> Tensor:
    """fp32, or fp64 if the input is fp64 (gradcheck): memory maths never runs below fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_read(weights: Weights, x: Tensor, *, residual_norm: bool, gain: Tensor | None = None) -> Tensor:
    """``M*(x)``: the memory's forward pass with fixed weights (no update).

    Args:
        weights: per layer ``[..., o, i]`` (e.g. ``[b, h, o, i]``).
        x: ``[..., n, k]`` inputs (the leading dims broadcast against the weights'), or ``[k]``.
        residual_norm: ``x + g * LN(MLP(x))`` (the deep memory) instead of the bare MLP.
        gain: g, broadcast against ``[..., n, v]`` (e.g. ``[1, h, 1, v]``); None = 1.

    Returns:
        ``[..., n, v]``.

    Reference: Titans (arXiv 2501.00663), eq. 15.
    """
    a = x
    for l, w in enumerate(weights):
        z = a @ w.transpose(-1, -2)
        a = F.silu(z) if l < len(weights) - 1 else z
    return x + _gained(F.layer_norm(z, z.shape[-1:], eps=LN_EPS), gain) if residual_norm else z


def clip_token_grads(dz: list[Tensor], a: list[Tensor], max_norm: float | None) -> list[Tensor]:
    """Clip each token's inner gradient to Frobenius norm ``max_norm`` (over all memory layers together).

    Token t's gradient is ``{dz_l[t] a_l[t]^T}_l``; its norm is ``sqrt(sum_l |dz_l[t]|^2 |a_l[t]|^2)``
    (an outer product's Frobenius norm is the product of its factors' norms), so the clip rescales
    ``dz`` and never forms the gradient. Below ``max_norm`` it is the identity. None or 0 = off.
    """
    if not max_norm:
        return dz
    sq = sum(d.square().sum(-1) * x.square().sum(-1) for d, x in zip(dz, a))  # [..., c] squared norms
    # clamp before the sqrt: a zero gradient (a padded token) would give sqrt's backward 0 * inf = NaN
    scale = (max_norm * sq.clamp_min(max_norm**2).rsqrt()).unsqueeze(-1)  # 1 below max_norm
    return [d * scale for d in dz]


def _gained(normed: Tensor, gain: Tensor | None) -> Tensor:
    return normed if gain is None else normed * gain


def memory_grads(
    weights: Weights, k: Tensor, v: Tensor, *, residual_norm: bool, gain: Tensor | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-token gradients of ``l_t = ||M(k_t) - v_t||^2`` w.r.t. each layer, in closed form.

    The gradient of token t w.r.t. layer l is the outer product ``dz_l[t] a_l[t]^T`` (error at the
    layer's output times its input); they are returned as those two factors, never multiplied out.
    Differentiable (it is plain tensor algebra), so the outer loss reaches k, v and the weights.

    Args:
        weights: per layer ``[b, h, o, i]``, the memory the gradients are taken at.
        k: ``[b, h, c, k]`` keys; v: ``[b, h, c, v]`` values.
        residual_norm, gain: as in :func:`memory_read`.

    Returns:
        ``(dz, a)``: lists over layers of ``[b, h, c, o_l]`` and ``[b, h, c, i_l]``.

    Reference: Titans (arXiv 2501.00663), eq. 12 (the loss) and the linear case below eq. 17.
    """
    ins, pres = [], []
    a = k
    for l, w in enumerate(weights):
        ins.append(a)
        z = a @ w.transpose(-1, -2)  # [b, h, c, o]
        pres.append(z)
        a = F.silu(z) if l < len(weights) - 1 else z
    if residual_norm:
        mu = z.mean(-1, keepdim=True)
        rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + LN_EPS)
        normed = (z - mu) * rstd
        dout = 2 * (k + _gained(normed, gain) - v)
        dout = _gained(dout, gain)  # through the gain, then the backward of a parameter-free LayerNorm
        dz = rstd * (dout - dout.mean(-1, keepdim=True) - normed * (dout * normed).mean(-1, keepdim=True))
    else:
        dz = 2 * (z - v)
    errs = [dz]
    for l in range(len(weights) - 2, -1, -1):
        dz = (dz @ weights[l + 1]) * _silu_grad(pres[l])
        errs.append(dz)
    return errs[::-1], ins


# ---------------------------------------------------------------------------------- naive
def titans_naive(
    weights: Weights,
    momentum: Weights,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    theta: Tensor,
    alpha: Tensor,
    *,
    chunk_size: int = 1,
    residual_norm: bool = True,
    gain: Tensor | None = None,
    max_grad_norm: float | None = None,
    first_order: bool = False,
) -> tuple[Tensor, Weights, Weights]:
    """The reference: the memory updated token by token, gradients by ``torch.func``.

    Args:
        weights: M_0, per layer ``[b, h, o, i]``; momentum: S_0, same shapes.
        q, k: ``[b, h, n, k]``; v: ``[b, h, n, v]``.
        eta: ``[b, h, n]`` momentum decay in (0, 1); theta: ``[b, h, n]`` inner learning rate >= 0;
            alpha: ``[b, h, n]`` forgetting in [0, 1).
        chunk_size: gradients are taken at the weights of the chunk's start (1 = online).
        residual_norm: as in :func:`memory_read`.
        gain: ``[h, v]`` the norm's gain (None = 1).
        max_grad_norm: clip each token's gradient (all layers together) to this norm; None/0 = off.
        first_order: take each gradient at the chunk's start weights detached (the outer gradient
            does not flow through the inner gradient's dependence on the weights).

    Returns:
        reads ``[b, h, n, v]``, and the weights and momentum after the last complete chunk.

    Reference: Titans (arXiv 2501.00663), eqs. 12-15 (c = 1) and eq. 16 (chunks of c).
    """
    b, h, n = q.shape[:3]
    with torch.autocast(q.device.type, enabled=False):

        def flat(t: Tensor) -> Tensor:
            return at_least_fp32(t).reshape(b * h, *t.shape[2:])

        W, S = [flat(w) for w in weights], [flat(s) for s in momentum]
        q, k, v, eta, theta, alpha = map(flat, (q, k, v, eta, theta, alpha))
        gains = None if gain is None else flat(at_least_fp32(gain).expand(b, *gain.shape))  # [bh, v]

        def loss(ws, kt, vt, gt):  # one (batch row, head): ws per layer [o, i], kt [k], vt [v], gt [v] or None
            return (memory_read(ws, kt, residual_norm=residual_norm, gain=gt) - vt).pow(2).sum()

        grad_fn = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, 0, None if gains is None else 0))
        committed = (W, S)
        reads = []
        for t in range(n):
            if t % chunk_size == 0:
                anchor = tuple(w.detach() for w in W) if first_order else tuple(W)  # the memory before the chunk's first token
            g = grad_fn(anchor, k[:, t], v[:, t], gains)
            if max_grad_norm:  # clip the token's gradient (all layers together) to max_grad_norm
                sq = torch.stack([gl.square().sum((-2, -1)) for gl in g]).sum(0)  # [bh]
                g = [gl * (max_grad_norm * sq.clamp_min(max_grad_norm**2).rsqrt())[:, None, None] for gl in g]
            e, th, keep = eta[:, t, None, None], theta[:, t, None, None], 1 - alpha[:, t, None, None]
            S = [e * s - th * gl for s, gl in zip(S, g)]
            W = [keep * w + s for w, s in zip(W, S)]
            reads.append(memory_read(W, q[:, t, None], residual_norm=residual_norm,
                                     gain=None if gains is None else gains[:, None]))  # [bh, 1, v]  # fmt: skip
            if (t + 1) % chunk_size == 0:
                committed = (W, S)
        out = rearrange(torch.cat(reads, dim=1), "(b h) n v -> b h n v", b=b)

        def unflat(ts) -> Weights:
            return tuple(t.reshape(b, h, *t.shape[1:]) for t in ts)

        return out, unflat(committed[0]), unflat(committed[1])


# ---------------------------------------------------------------------------------- chunked
def _log_keep(alpha: Tensor) -> Tensor:
    """``max(log(1 - alpha), _LOG_FLOOR)``, with a finite gradient at ``alpha = 1``.

    A sigmoid gate saturates to exactly 1.0 in fp32 for logits above ~17 (a trained forget gate
    does: full erasure on a chosen token). ``log1p(-1) = -inf`` is floored, so the floor's backward
    passes 0, and log1p's backward multiplied it by ``1 / (1 - alpha) = inf``: 0 * inf = NaN in
    every gradient upstream (a warm-started ``titans-mag`` stopped on a NaN gradient norm). The
    value is unchanged bit for bit; where ``alpha >= 1`` the floor is taken directly and its
    gradient is 0 (the floored function is flat there).
    """
    alive = alpha < 1
    safe = torch.where(alive, alpha, torch.zeros_like(alpha))  # log1p never sees -1, nor its backward 1 / 0
    return torch.where(alive, torch.log1p(-safe), torch.full_like(alpha, _LOG_FLOOR)).clamp_min(_LOG_FLOOR)


def _chunk_coefficients(eta: Tensor, theta: Tensor, alpha: Tensor) -> dict[str, Tensor]:
    """Closed form of a chunk's momentum/decay recurrences, for every chunk at once.

    With E_t = prod_{j<=t} eta_j and D_t = prod_{j<=t} (1 - alpha_j) inside a chunk (t from its
    first token), unrolling eqs. 13-14 from the chunk's start (W_0, S_0) gives::

        W_t = A_t W_0 + B_t S_0 + sum_{i<=t} Gamma_ti u_i          (u_i: token i's gradient)
        S_t = E_t S_0 - sum_{i<=t} theta_i (E_t / E_i) u_i
        A_t = D_t,   B_t = sum_{j<=t} (D_t / D_j) E_j,   Gamma_ti = -theta_i sum_{i<=j<=t} (D_t / D_j)(E_j / E_i)

    Ratios are exponentials of differences of cumulative log gates (never above 1: stable).

    Args:
        eta, theta, alpha: ``[b, h, g, c]``.

    Returns:
        dict of ``A, B: [b, h, g, c]``, ``G: [b, h, g, c, c]`` (Gamma, [t, i]) and the chunk-end
        momentum coefficients ``E_end: [b, h, g]``, ``S_coef: [b, h, g, c]``.
    """
    c = eta.shape[-1]
    LE = eta.clamp_min(1e-38).log().clamp_min(_LOG_FLOOR).cumsum(-1)  # [b, h, g, c]
    LD = _log_keep(alpha).cumsum(-1)
    future = ~torch.ones(c, c, dtype=torch.bool, device=eta.device).tril()  # [t, j]: j > t
    P = (LD[..., :, None] - LD[..., None, :]).masked_fill(future, float("-inf")).exp()  # [.., t, j] = D_t / D_j
    Q = (LE[..., :, None] - LE[..., None, :]).masked_fill(future, float("-inf")).exp()  # [.., j, i] = E_j / E_i
    return {
        "A": LD.exp(),
        "B": (P @ LE.exp()[..., None])[..., 0],
        "G": -(P @ Q) * theta[..., None, :],
        "E_end": LE[..., -1].exp(),
        "S_coef": -theta * Q[..., -1, :],
    }


def titans_chunked(
    weights: Weights,
    momentum: Weights,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    theta: Tensor,
    alpha: Tensor,
    *,
    chunk_size: int = 16,
    residual_norm: bool = True,
    stop_grad: bool = False,
    gain: Tensor | None = None,
    max_grad_norm: float | None = None,
    first_order: bool = False,
) -> tuple[Tensor, Weights, Weights]:
    """The fast form: gradients at each chunk's start, momentum and decay solved per chunk.

    Equal to :func:`titans_naive` with the same ``chunk_size`` (to float rounding); with
    ``chunk_size=1`` it is the online rule. The first token is assumed to start a chunk.

    Args:
        weights: per layer ``[b, h, o, i]``, the memory at the start (a chunk boundary).
        momentum: the surprise S at the start, same shapes.
        q, k: ``[b, h, n, k]`` (l2-normalised by the caller if wanted); v: ``[b, h, n, v]``.
        eta: ``[b, h, n]`` momentum decay in (0, 1]; theta: ``[b, h, n]`` inner lr >= 0;
            alpha: ``[b, h, n]`` forgetting in [0, 1].
        chunk_size: c.
        residual_norm: as in :func:`memory_read`.
        stop_grad: cut the outer gradient through the inner updates (the gradients, gates and
            the updated weights are detached; the reads still depend on q and on the weights
            given).
        gain: ``[h, v]`` the norm's gain (None = 1).
        max_grad_norm: clip each token's gradient to this norm (:func:`clip_token_grads`); None/0 = off.
        first_order: the gradients are taken at the chunk's start weights detached: the outer
            gradient still reaches k, v, the gates, the gain and (through the decayed carry
            ``A W_0``) the weights, but not through ``d grad l_t(W) / dW``. Forward values unchanged.

    Returns:
        reads ``[b, h, n, v]`` (fp32), and the weights and momentum after the last complete
        chunk (the given tensors themselves if no chunk completes).

    Reference: Titans (arXiv 2501.00663), eqs. 16-18 (mini-batch gradient descent with momentum
    and weight decay, computed per chunk with matmuls).
    """
    b, h, n = q.shape[:3]
    c = chunk_size
    g = -(-n // c)  # chunks, the last one possibly partial
    complete = n // c
    pad = g * c - n
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, eta, theta, alpha = map(at_least_fp32, (q, k, v, eta, theta, alpha))
        W, S = [at_least_fp32(w) for w in weights], [at_least_fp32(s) for s in momentum]
        if pad:  # neutral padding (eta 1, theta 0, alpha 0): never read back, never committed
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            eta = F.pad(eta, (0, pad), value=1.0)
            theta, alpha = F.pad(theta, (0, pad)), F.pad(alpha, (0, pad))
        if stop_grad:
            k, v, eta, theta, alpha = (t.detach() for t in (k, v, eta, theta, alpha))
        gain = None if gain is None else at_least_fp32(gain)[None, :, None, :]  # [1, h, 1, v]
        coef = _chunk_coefficients(*(rearrange(t, "b h (g c) -> b h g c", c=c) for t in (eta, theta, alpha)))
        # per-chunk views by unbind, never by indexing in the loop: the backward of x[j] allocates a
        # zero tensor of x's full size for every j, which made the backward quadratic in the chunks
        A, B, G = (coef[name].unbind(2) for name in ("A", "B", "G"))  # g x [b, h, c], g x [b, h, c, c]
        E_end, S_coef = coef["E_end"].unbind(2), coef["S_coef"].unbind(2)  # g x [b, h], g x [b, h, c]
        qc, kc, vc = (rearrange(t, "b h (g c) k -> g b h c k", c=c).unbind(0) for t in (q, k, v))
        reads = []
        for j in range(g):  # sequential over chunks: the gradients of chunk j need the weights at its start
            dz, a = memory_grads([w.detach() for w in W] if stop_grad or first_order else W, kc[j], vc[j], residual_norm=residual_norm,
                                 gain=gain.detach() if stop_grad and gain is not None else gain)  # fmt: skip
            dz = clip_token_grads(dz, a, max_grad_norm)
            # every token reads with its own weights (dual form): W_t r = A_t W_0 r + B_t S_0 r + sum_i G_ti (a_i . r) dz_i
            Aj, Bj = A[j][..., None], B[j][..., None]  # [b, h, c, 1]
            r = qc[j]
            for l in range(len(W)):
                z = Aj * (r @ W[l].transpose(-1, -2)) + Bj * (r @ S[l].transpose(-1, -2)) + (G[j] * (r @ a[l].transpose(-1, -2))) @ dz[l]
                r = F.silu(z) if l < len(W) - 1 else z
            reads.append(qc[j] + _gained(F.layer_norm(z, z.shape[-1:], eps=LN_EPS), gain) if residual_norm else z)
            if j < complete:  # commit the chunk: the memory and momentum after its last token
                Ae, Be, Ee = Aj[:, :, -1, :, None], Bj[:, :, -1, :, None], E_end[j][..., None, None]  # [b, h, 1, 1]
                Ge, Se = G[j][:, :, -1, :, None], S_coef[j][..., None]  # [b, h, c, 1]
                W = [Ae * w + Be * s + einsum(Ge * e, x, "b h c o, b h c i -> b h o i") for w, s, e, x in zip(W, S, dz, a)]
                S = [Ee * s + einsum(Se * e, x, "b h c o, b h c i -> b h o i") for s, e, x in zip(S, dz, a)]
                if stop_grad:
                    W, S = [w.detach() for w in W], [s.detach() for s in S]
        out = rearrange(torch.stack(reads), "g b h c v -> b h (g c) v")[:, :, :n]
    committed_w = tuple(W) if complete else tuple(weights)
    committed_s = tuple(S) if complete else tuple(momentum)
    return out, committed_w, committed_s
