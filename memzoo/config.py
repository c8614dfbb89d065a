"""`MemZooConfig`: the backbone's sizes plus which memory design every layer uses."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .validation import check_value

__all__ = ["MemZooConfig", "BACKBONE_FIELDS"]

# The backbone's own knobs (everything else a user passes to `memzoo.build` belongs to the design).
BACKBONE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "rope_theta",
    "norm_eps",
    "initializer_range",
    "tie_word_embeddings",
)


class MemZooConfig(PretrainedConfig):
    """Config of a :class:`~memzoo.MemZooForCausalLM`.

    Args:
        vocab_size: tokens in the vocabulary (259 = the default byte tokenizer, `memzoo.tokenizer()`).
        d_model: width d of the residual stream.
        n_layers: number of blocks; every block's token mixer is the configured memory design.
        n_heads: attention / memory heads h per layer (head dim k = d_model // n_heads).
        d_ff: hidden width of the SwiGLU feed-forward; default 8/3 * d_model rounded up to 32
            (the LLaMA rule, so the FFN costs about what a 4x GELU MLP would).
        rope_theta: RoPE base, for designs with local softmax attention.
        norm_eps: RMSNorm epsilon.
        initializer_range: std of the normal init of Linear and Embedding weights.
        tie_word_embeddings: share the input embedding with the output head (saves vocab x d).
        memory: registry name of the memory design (see `memzoo.available()`).
        memory_config: that design's config dataclass as a dict (missing keys take the design's
            defaults, so old checkpoints keep loading when a design gains a knob).
    """

    model_type = "memzoo"

    def __init__(
        self,
        vocab_size: int = 259,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        memory: str = "full",
        memory_config: dict[str, Any] | None = None,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        **kwargs,
    ):
        for name, value, kind, limits in (
            ("vocab_size", vocab_size, int, dict(ge=1)),
            ("d_model", d_model, int, dict(ge=1)),
            ("n_layers", n_layers, int, dict(ge=1)),
            ("n_heads", n_heads, int, dict(ge=1)),
            ("d_ff", d_ff, int | None, dict(ge=1)),
            ("rope_theta", rope_theta, float, dict(gt=1)),  # theta <= 1 leaves every position the same rotation or none
            ("norm_eps", norm_eps, float, dict(gt=0)),
            ("initializer_range", initializer_range, float, dict(ge=0)),
            ("tie_word_embeddings", tie_word_embeddings, bool, {}),
            ("memory", memory, str, {}),
        ):
            check_value(name, value, kind, "MemZooConfig.", **limits)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff if d_ff is not None else 32 * -(-(8 * d_model // 3) // 32)
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.memory = memory
        self.memory_config = dict(memory_config or {})
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # transformers' generic names, so tools that read them (e.g. size estimators) understand us.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads


AutoConfig.register("memzoo", MemZooConfig, exist_ok=True)  # AutoConfig.from_pretrained(memzoo checkpoint)
