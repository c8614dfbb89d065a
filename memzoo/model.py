"""The one backbone every memory design plugs into.

A pre-norm decoder: token embedding -> n_layers x Block -> RMSNorm -> tied output head. Each
Block is ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))``, where *mixer* is the configured
:class:`~memzoo.interface.MemoryModule` (it replaces self-attention). There is no absolute
position embedding: each design places positions itself (RoPE on segment-local or slot positions),
which is how a model trained on 4K tokens runs on 1M without seeing an unknown position.

Labels follow transformers: ``labels`` has the shape of ``input_ids``, ``labels[:, t]`` is the token
*at* position t (``labels=input_ids`` is the usual language-modelling call, -100 = ignore), and the
model shifts them: position t's logits are scored against ``labels[:, t + 1]``. One call cannot
score its last position (the next token is in the next call); :meth:`MemZooForCausalLM.stream` and
the trainer shift the whole stream once, with :func:`shift_labels`, so no prediction is lost at a
segment boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .config import MemZooConfig
from .interface import MemoryModule, MemoryState, iter_tensors
from .registry import memory_config

__all__ = ["MemZooForCausalLM", "MemZooState", "MemZooOutput", "StreamOutput", "RMSNorm", "SwiGLU", "Block", "shift_labels"]

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, fill: int | float | bool = IGNORE_INDEX) -> Tensor:
    """transformers-style labels [b, n] -> next-token targets [b, n], aligned with the logits.

    ``out[:, t] = labels[:, t + 1]``, the token position t's logits should predict; the last
    position has none and gets ``fill``. Shift a whole stream once, then cut it into segments, so
    the prediction across each segment boundary is kept. The same call aligns anything indexed
    like the labels: per-token loss weights (``fill=0.0``) or masks (``fill=False``).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, tokens], got shape {tuple(labels.shape)}")
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), fill)], dim=1)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for stability."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:  # x: [..., d]
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, n, d]
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm block whose token mixer is a memory design."""

    def __init__(self, config: MemZooConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer: MemoryModule = memory_config(config.memory, **config.memory_config).build_module(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.d_ff)

    gradient_checkpointing = False  # set by transformers' ``model.gradient_checkpointing_enable()``

    def forward(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:  # x: [b, n, d]
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


@dataclass
class MemZooState(MemoryState):
    """The whole model's state: one design state per layer.

    Attributes:
        layers: the per-layer states, in layer order.
        batch_size: b, checked against every input so a state is never applied to another batch.
        position: tokens of the stream consumed so far.
        built_for: what the state was made for (the design, its resolved config and the backbone's
            sizes, as :meth:`MemZooForCausalLM.init_state` writes it); a model refuses a state made
            for another (a ``segment_len`` 64 state in a ``segment_len`` 32 model would run, wrongly).
    """

    layers: list
    batch_size: int
    position: int = 0
    built_for: str = ""


def _config_diff(theirs: dict, ours: dict, prefix: str = "") -> str:
    """``"memory_config.segment_len: 64 -> 32, ..."`` for the entries where two signatures differ."""
    parts = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _config_diff(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key}: state {a!r}, model {b!r}")
    return ", ".join(parts)


@dataclass
class MemZooOutput(ModelOutput):
    """Output of :meth:`MemZooForCausalLM.forward`.

    Attributes:
        loss: mean cross-entropy of each position's logits against the next label, over labels != -100
            (None without labels).
        logits: [b, n, vocab].
        state: the state after these tokens.
        hidden_states: with ``output_hidden_states=True``, the residual stream [b, n, d] after the
            embedding and after every block, the last one through the final norm (transformers'
            convention: ``n_layers + 1`` tensors).
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    state: MemZooState | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class StreamOutput:
    """Output of :meth:`MemZooForCausalLM.stream`.

    Attributes:
        logits: [b, vocab] of the last token, or [b, n, vocab] with ``keep_logits=True``.
        loss: mean cross-entropy over the whole stream's labels (None without labels).
        state: the state after the stream.
        n_tokens: tokens streamed.
    """

    logits: Tensor
    loss: Tensor | None
    state: MemZooState
    n_tokens: int


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' progress bars off for the block (its "Loading weights" / "Writing model shards"), as they were after."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class MemZooPreTrainedModel(PreTrainedModel):
    config_class = MemZooConfig
    base_model_prefix = "memzoo"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: a weight missing, unexpected or of another shape raises.

        transformers fills missing weights with fresh random values and reports it only on stderr; a
        memzoo checkpoint whose file and config disagree (a deleted tensor, ``n_layers`` edited,
        ``tie_word_embeddings`` flipped) must not load as a silently different model.
        """
        want_info = kwargs.pop("output_loading_info", False)
        with _no_transformers_bars():  # a one-file checkpoint loads in milliseconds: its bar only floods logs
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {kind: sorted(map(str, info.get(kind) or [])) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            listed = "; ".join(f"{kind.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                               for kind, keys in problems.items())  # fmt: skip
            raise ValueError(
                f"{str(where)!r}: the weights file does not match its config.json ({listed}). The checkpoint was "
                "edited or written by another version: re-save it with model.save_pretrained, or fix config.json"
            )
        loaded = (model, info) if want_info else model
        # safetensors leaves parameters at 8-byte offsets of the file, and MKL rounds differently
        # when a matrix operand is not 64-byte aligned (e.g. the weight of a one-token Linear), so
        # a reloaded model was not bit-identical to the saved one: give them fresh memory.
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type == "cpu" and p.data_ptr() % 64:
                    p.data = p.data.clone()
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this children-first, so a design's own reset runs after (and wins
        # over) the generic init of its Linears. Use torch.nn.init functions only: transformers
        # guards them so that weights loaded from a checkpoint are not overwritten.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if hasattr(module, "reset_memory_parameters"):
            module.reset_memory_parameters()


class MemZooForCausalLM(MemZooPreTrainedModel, GenerationMixin):
    """A causal LM whose every layer mixes tokens with the configured memory design.

    Build one with :func:`memzoo.build`; load one with :func:`memzoo.load` or
    ``transformers.AutoModelForCausalLM.from_pretrained`` (after ``import memzoo``).
    """

    def __init__(self, config: MemZooConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # Untied head only when asked: the tied one costs no parameters and keeps checkpoints small.
        self.head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *, tokenizer=None, dtype: torch.dtype | None = None, **kwargs) -> None:
        """Save weights (safetensors), config and tokenizer, atomically.

        Everything is written to a temporary folder beside ``save_directory`` and renamed into
        place, so an interrupted save never leaves a half-written checkpoint under that name.

        Args:
            save_directory: target folder (replaced if it exists).
            tokenizer: saved beside the weights (default: ``memzoo.tokenizer()``).
            dtype: store floating weights in this dtype (e.g. ``torch.bfloat16`` to halve the size).
            **kwargs: passed to ``transformers.PreTrainedModel.save_pretrained``.
        """
        from .io import atomic_directory
        from .tokenization import tokenizer as default_tokenizer

        if dtype is not None:
            kwargs["state_dict"] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        with atomic_directory(save_directory) as tmp, _no_transformers_bars():  # a bar per save floods a training log
            super().save_pretrained(tmp, **kwargs)
            (tokenizer or default_tokenizer()).save_pretrained(tmp)
            _write_auto_map(Path(tmp))

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MemZooState:
        """The state before the first token: one design state per layer.

        Args:
            batch_size: b.
            device: default: the model's device.
            dtype: floating dtype of memory tensors (default float32).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = device if device is not None else self.device
        if dtype is not None:
            self._check_state_dtype({dtype})
        layers = [blk.mixer.init_state(batch_size, device=device, dtype=dtype) for blk in self.blocks]
        return MemZooState(layers=layers, batch_size=batch_size, built_for=self._state_signature())

    def _state_signature(self) -> str:
        """The design, its resolved config and the backbone sizes a state depends on (a JSON string)."""
        cfg = self.config
        design = dataclasses.asdict(memory_config(cfg.memory, **cfg.memory_config))  # defaults filled in
        return json.dumps({"memory": cfg.memory, "memory_config": design, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                           "n_layers": cfg.n_layers}, sort_keys=True)  # fmt: skip

    def _check_inputs(self, input_ids: Tensor, state: MemZooState | None) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor [b, n], got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long()")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}; "
                "use input_ids[None] for a single sequence"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty (0 tokens): feed at least one token")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has batch size 0: feed at least one sequence")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got min {lo}, max {hi}; "
                "was the input made with another tokenizer? use memzoo.tokenizer() or the checkpoint's"
            )
        if state is not None:
            if not isinstance(state, MemZooState):
                raise TypeError(f"state must be a MemZooState from model.init_state(), got {type(state).__name__}")
            if state.batch_size != input_ids.shape[0]:
                raise ValueError(
                    f"state was made for batch size {state.batch_size} but input_ids has batch size "
                    f"{input_ids.shape[0]}; call model.init_state({input_ids.shape[0]})"
                )
            if len(state.layers) != len(self.blocks):
                raise ValueError(f"state has {len(state.layers)} layers, the model {len(self.blocks)}")
            self._check_state_dtype({t.dtype for t in iter_tensors(state) if t.is_floating_point()})
            mine = self._state_signature()
            if state.built_for != mine:
                theirs = json.loads(state.built_for) if state.built_for else {}
                ours = json.loads(mine)
                diff = _config_diff(theirs, ours)
                raise ValueError(
                    f"this state was made for another model ({diff or 'a state without a signature'}); "
                    f"a state only fits the model that made it: call model.init_state({state.batch_size})"
                )

    def _check_state_dtype(self, dtypes: set[torch.dtype]) -> None:
        """A state computes in float32, or in the model's own dtype (a float64 model for references)."""
        allowed = {torch.float32, self.dtype}
        if dtypes - allowed:
            raise ValueError(
                f"the state holds {sorted(map(str, dtypes - allowed))} tensors, the model is {self.dtype}: memory maths "
                f"runs in float32 or the model's dtype; call model.init_state(b) (float32) or convert the model first"
            )

    def _logits(self, h: Tensor) -> Tensor:  # h: [b, n, d] -> [b, n, vocab]
        h = self.norm(h)
        return self.head(h) if self.head is not None else h @ self.embed.weight.T

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        state: MemZooState | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs,
    ) -> MemZooOutput:
        """Run the next segment of the stream.

        Args:
            input_ids: [b, n] token ids (n >= 1).
            state: from :meth:`init_state` or the previous call (default: a fresh stream).
            labels: [b, n], transformers' convention: ``labels[:, t]`` is the token at position t
                (``labels=input_ids``, -100 where no loss); the model shifts them, so the loss is
                over predictions 0..n-2 (the last position's target is in the next call: use
                :meth:`stream` or :func:`shift_labels` to keep it).
            attention_mask: [b, n] 1 for real tokens, 0 for padding, as a tokenizer returns it.
                All ones, or right padding (each row's ones, then zeros: a causal model's real
                tokens never see the pads) is honoured; the state after a padded call has read the
                pads, so ``state`` is None then. Left padding or holes raise: every token enters a
                design's running state (a memory write, a cache slot), so none can be skipped.
            num_items_in_batch: with gradient accumulation (transformers' ``Trainer`` passes it),
                the loss is the *sum* of cross-entropies divided by this count instead of a mean.

        Returns:
            :class:`MemZooOutput` with ``loss`` (if labels), ``logits`` [b, n, vocab] and ``state``.
        """
        unexpected = set(kwargs) - {"return_dict", "use_cache", "output_attentions", "output_hidden_states"}
        if unexpected:
            raise TypeError(f"forward() got unexpected argument(s) {sorted(unexpected)}")
        if kwargs.get("output_attentions"):
            raise ValueError(
                "output_attentions=True: memzoo's designs do not all have an attention matrix to return (a compressive "
                "memory reads without one); for an eviction cache's attention use memzoo.hf.EvictingCache on a transformers model"
            )
        self._check_inputs(input_ids, state)
        padded = attention_mask is not None and self._check_attention_mask(attention_mask, input_ids)
        input_ids = input_ids.long()  # uint8 / int16 ids are fine token ids; nn.Embedding takes int64
        if state is None:
            state = self.init_state(input_ids.shape[0], device=input_ids.device)
        h = self.embed(input_ids)  # [b, n, d]
        hidden = [h] if kwargs.get("output_hidden_states") else None
        new_layers = []
        for blk, layer_state in zip(self.blocks, state.layers):
            if blk.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: the state is a dataclass of tensors, and its gradient path (BPTT
                # across segments) must survive the recompute.
                h, layer_state = torch.utils.checkpoint.checkpoint(blk, h, layer_state, use_reentrant=False)
            else:
                h, layer_state = blk(h, layer_state)
            new_layers.append(layer_state)
            if hidden is not None:
                hidden.append(h)
        logits = self._logits(h)
        if hidden is not None:
            hidden[-1] = self.norm(h)
        loss = None
        if labels is not None:
            targets = shift_labels(self._check_labels(labels, input_ids, allow_empty=num_items_in_batch is not None))
            if num_items_in_batch is None:
                loss = self._loss(logits, targets)
            else:
                loss = self._loss(logits, targets, reduction="sum") / torch.as_tensor(num_items_in_batch).to(logits.device)
        next_state = None if padded else dataclasses.replace(state, layers=new_layers, position=state.position + input_ids.shape[1])
        out = MemZooOutput(loss=loss, logits=logits, state=next_state, hidden_states=tuple(hidden) if hidden else None)
        return out if kwargs.get("return_dict", True) else out.to_tuple()

    @staticmethod
    def _check_attention_mask(attention_mask: Tensor, input_ids: Tensor) -> bool:
        """True when some row is right-padded; a clear error for a mask no design can honour."""
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if bool(mask.all()):
            return False
        # right padding: along each row the mask never goes from 0 back to 1
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()) or not bool(mask[:, 0].all()):
            raise ValueError(
                "attention_mask has left padding or holes: every token enters a memzoo design's running state (a memory "
                "write, a cache slot), so a masked token cannot be skipped. Right-pad (tokenizer.padding_side = 'right') or "
                "feed rows of equal length; model.generate takes left-padded prompts (it strips each row's pads)"
            )
        return True

    @staticmethod
    def _check_labels(labels: Tensor, input_ids: Tensor, allow_empty: bool = False) -> Tensor:
        """The labels as int64, or a clear error: wrong shape or dtype, pre-shifted, or nothing to predict."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer token ids (and -100 to ignore), got dtype {labels.dtype}")
        labels = labels.long()
        scored = labels[:, 1:] != IGNORE_INDEX  # the labels the shifted loss reads
        if not allow_empty and not bool(scored.any()):
            raise ValueError(
                "no label after the first position is set (-100 everywhere, or a one-token call): labels are shifted inside "
                "the model, so labels[:, 0] is never scored and there is no token to compute a loss on (its mean would be NaN); "
                "pass labels=None for a call that only advances the state, or use model.stream(ids, labels=...)"
            )
        # The convention before transformers' was pre-shifted: catch such labels instead of training on them.
        before = labels[:, :-1] != IGNORE_INDEX
        if bool(before.any()) and torch.equal(labels[:, :-1][before], input_ids[:, 1:][before].long()):
            unshifted = labels != IGNORE_INDEX
            if not torch.equal(labels[unshifted], input_ids[unshifted].long()):
                raise ValueError(
                    "labels look pre-shifted (labels[:, t] == input_ids[:, t + 1]): memzoo follows transformers, labels[:, t] "
                    "is the token at position t and the model shifts them. Pass labels=input_ids (-100 where no loss)"
                )
        return labels

    @staticmethod
    def _loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of logits [b, n, V] against *shifted* targets [b, n] (-100 ignored)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)

    # ------------------------------------------------------------------ long streams
    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor,
        segment_len: int = 1024,
        *,
        state: MemZooState | None = None,
        labels: Tensor | None = None,
        keep_logits: bool = False,
        progress: bool = False,
    ) -> StreamOutput:
        """Feed a stream of any length, ``segment_len`` tokens per call, in bounded memory.

        Outputs do not depend on ``segment_len`` (split invariance); it only trades speed for
        peak activation memory. Runs without gradients.

        Args:
            input_ids: [b, n] token ids, any n >= 1.
            segment_len: tokens per forward call.
            state: continue from this state (default: a fresh stream).
            labels: [b, n] in transformers' convention (``labels=input_ids``, -100 ignored): shifted
                once over the whole stream, so the prediction across every segment boundary is
                scored; the loss is their mean (the last token's target lies beyond the stream).
            keep_logits: return all logits [b, n, vocab] (costs n x vocab floats) instead of the
                last token's [b, vocab].
            progress: show a tqdm progress bar in tokens.

        Returns:
            :class:`StreamOutput`.
        """
        if not isinstance(segment_len, int) or segment_len < 1:
            raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
        self._check_inputs(input_ids, state)
        targets = shift_labels(self._check_labels(labels, input_ids)) if labels is not None else None
        if state is None:
            state = self.init_state(input_ids.shape[0], device=input_ids.device)
        n = input_ids.shape[1]
        loss_sum = torch.zeros((), device=input_ids.device)
        n_labels = 0
        kept = []  # all logits with keep_logits, else only the latest segment's last token
        bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc="stream")
        for start in range(0, n, segment_len):
            ids = input_ids[:, start : start + segment_len]
            out = self(ids, state=state)
            state = out.state
            if targets is not None:
                piece = targets[:, start : start + segment_len]
                loss_sum += self._loss(out.logits, piece, reduction="sum")
                n_labels += int((piece != IGNORE_INDEX).sum())
            if keep_logits:
                kept.append(out.logits)
            else:
                kept = [out.logits[:, -1]]
            bar.update(ids.shape[1])
        bar.close()
        logits = torch.cat(kept, dim=1) if keep_logits else kept[-1]
        loss = loss_sum / max(n_labels, 1) if targets is not None else None
        return StreamOutput(logits=logits, loss=loss, state=state, n_tokens=n)

    # ------------------------------------------------------------------ generation
    # transformers' GenerationMixin runs the loop (greedy, sampling with top-k/top-p, beams,
    # GenerationConfig, stopping criteria, streamers, pipeline("text-generation")); the memory state
    # rides in model_kwargs["state"], a name its beam search reorders through _reorder_cache.

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        generation_config=None,
        *,
        state: MemZooState | None = None,
        segment_len: int | None = 1024,
        progress: bool = False,
        return_state: bool = False,
        **kwargs,
    ):
        """transformers' ``generate``, after streaming the prompt in bounded memory.

        Everything but the prompt's last token is read ``segment_len`` tokens per call (as
        :meth:`stream`), then ``transformers.GenerationMixin.generate`` decodes from that state, one
        token per call: greedy, ``do_sample`` with ``temperature`` / ``top_k`` / ``top_p``,
        ``num_beams`` (the state's rows follow their beams), ``num_return_sequences``,
        ``generation_config``, ``eos_token_id`` (an int or a list; finished rows are filled with
        ``pad_token_id``), ``return_dict_in_generate``, streamers. Decoding one token at a time is the
        computation training did (split invariance), for every design.

        Args:
            input_ids: [b, n] prompt (n >= 1).
            generation_config: a ``transformers.GenerationConfig`` (default: the model's).
            state: continue a stream (e.g. ask a second question after a long context); a batch-1
                state serves a batch of prompts.
            segment_len: tokens per call while reading the prompt (None: the whole prompt in one call).
            progress: progress bar over the prompt.
            return_state: return ``(ids, state)``, the state after the prompt and every generated
                token but the last (the one a next call would start from).
            **kwargs: generation arguments (``max_new_tokens``, ``do_sample``, ...) and
                ``attention_mask``: left padding (``tokenizer.padding_side = "left"``) is honoured by
                generating each group of rows of one real length with its pads stripped (a design's
                running state cannot skip a pad), so row i gives what it gives alone.

        Returns:
            [b, n + new] token ids, or what transformers returns for ``return_dict_in_generate=True``
            (its cache field holds the state); with ``return_state``, ``(ids, state)``.
        """
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError("generate needs input_ids [batch, n >= 1]; memzoo models take no inputs_embeds")
        if isinstance(generation_config, int):
            raise TypeError(
                f"generate's second argument is a GenerationConfig (transformers' order); pass max_new_tokens={generation_config} by name"
            )
        if "generator" in kwargs:
            raise TypeError("generate() samples with torch's global RNG, as transformers does: call torch.manual_seed(seed) "
                            "(inside torch.random.fork_rng() to leave the caller's RNG alone) instead of passing generator=")  # fmt: skip
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.bool().all()):
            return self._generate_left_padded(input_ids, mask, generation_config, state, segment_len, progress, return_state, **kwargs)
        if state is not None and state.batch_size == 1 and input_ids.shape[0] > 1:
            state = state.expand_batch(input_ids.shape[0])
        self._check_inputs(input_ids, state)
        consumed = 0
        if segment_len is not None and input_ids.shape[1] > 1:
            state = self.stream(input_ids[:, :-1], segment_len, state=state, progress=progress).state
            consumed = input_ids.shape[1] - 1
        if state is not None:
            kwargs["state"] = state
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = getattr(generation_config or self.generation_config, "return_dict_in_generate", False)
        out = super().generate(
            input_ids, generation_config, return_dict_in_generate=want_dict or return_state,
            memzoo_offset=(0 if state is None else state.position) - consumed, **kwargs,
        )  # fmt: skip
        if not return_state:
            return out
        final = next(getattr(out, name) for name in ("cache", "past_key_values") if getattr(out, name, None) is not None)
        return (out if want_dict else out.sequences), final

    def _generate_left_padded(self, input_ids, mask, generation_config, state, segment_len, progress, return_state, **kwargs) -> Tensor:
        """Left-padded prompts, generated per group of equal real length with the pads stripped, then
        re-assembled: exactly what each row gives alone (a design's running state cannot skip a pad)."""
        mask = mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
        lengths = mask.sum(1)
        if not bool((mask == (torch.arange(mask.shape[1], device=mask.device) >= mask.shape[1] - lengths[:, None])).all()):
            raise ValueError(
                "generate takes left padding (tokenizer.padding_side = 'left'): each row's pads first, then its tokens; "
                "this attention_mask has right padding or holes"
            )
        if return_state or kwargs.get("return_dict_in_generate") or (lengths == 0).any():
            raise ValueError("a left-padded batch returns token ids only (no return_state / return_dict_in_generate), and "
                             "every row needs a token: generate rows of equal length for states")  # fmt: skip
        config = generation_config or self.generation_config
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        pad = pad if pad is not None else self.config.pad_token_id
        per_row = max(kwargs.get("num_return_sequences") or config.num_return_sequences or 1, 1)
        rows: list[Tensor | None] = [None] * input_ids.shape[0]
        for n in lengths.unique().tolist():  # rows of one real length share a batch
            group = (lengths == n).nonzero()[:, 0]
            group_state = None if state is None else (state if state.batch_size == 1 else state.select_rows(group))
            prompt = input_ids[group, -n:]
            out = self.generate(prompt, generation_config, state=group_state, segment_len=segment_len, progress=progress, **kwargs)
            for j, i in enumerate(group.tolist()):
                rows[i] = out[j * per_row : (j + 1) * per_row, n:]  # [per_row, new]
        width = max(r.shape[1] for r in rows)
        new = torch.cat([F.pad(r, (0, width - r.shape[1]), value=pad) for r in rows])  # finished rows end in pads
        return torch.cat([input_ids.repeat_interleave(per_row, dim=0), new], dim=1)

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, state: MemZooState | None = None, attention_mask: Tensor | None = None, memzoo_offset: int = 0, **kwargs
    ) -> dict:  # fmt: skip
        """The tokens of ``input_ids`` the state has not read yet (all of them at first, then the newest one).

        ``memzoo_offset`` = the state's position when ``input_ids[:, 0]`` was fed (set by :meth:`generate`).
        """
        consumed = (0 if state is None else state.position) - memzoo_offset
        inputs = {"input_ids": input_ids[:, consumed:], "state": state}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, consumed:]
        for name in ("output_hidden_states", "return_dict"):
            if kwargs.get(name) is not None:
                inputs[name] = kwargs[name]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: MemZooOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["state"] = outputs.state
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        state = model_kwargs.pop("state", None)  # beams and num_return_sequences repeat each row's state with its prompt
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if state is not None:
            rows = torch.arange(state.batch_size).repeat_interleave(expand_size)
            model_kwargs["state"] = state if expand_size == 1 else state.select_rows(rows)
        return input_ids, model_kwargs

    def _reorder_cache(self, state: MemZooState, beam_idx: Tensor) -> MemZooState:
        return state.select_rows(beam_idx)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the memory state is the model's own; transformers must not make a KV cache for it


#: the two files ``auto_map`` names: each imports its class from the installed memzoo package, so
#: ``trust_remote_code=True`` opens a checkpoint without ``import memzoo`` first (memzoo must be installed).
_REMOTE_CODE = {
    "configuration_memzoo.py": ("AutoConfig", "from memzoo.config import MemZooConfig", "MemZooConfig"),
    "modeling_memzoo.py": ("AutoModelForCausalLM", "from memzoo.model import MemZooForCausalLM", "MemZooForCausalLM"),
}


def _write_auto_map(folder: Path) -> None:
    """Add ``auto_map`` to a saved checkpoint's config.json and write the files it points to."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {}
    for file, (auto_class, line, name) in _REMOTE_CODE.items():
        doc = '"""Opens this memzoo checkpoint with trust_remote_code=True; needs ``pip install memzoo``."""'
        (folder / file).write_text(f'{doc}\n\n{line}\n\n__all__ = ["{name}"]\n')
        config["auto_map"][auto_class] = f"{file.removesuffix('.py')}.{name}"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


AutoModelForCausalLM.register(MemZooConfig, MemZooForCausalLM, exist_ok=True)  # AutoModelForCausalLM.from_pretrained(memzoo checkpoint)
