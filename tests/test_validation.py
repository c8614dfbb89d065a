"""Bad configs and bad inputs get a clear error naming what is wrong; everything else computes finite numbers.

The fuzz tests draw every field of every design's config (and the backbone's) from values of the
right and the wrong types, in and out of range, and inputs of every shape and dtype: each draw must
either raise ``ValueError``/``TypeError`` naming the offending field or argument, or build a model
whose forward pass gives finite logits. No third outcome (an obscure crash, a NaN, a silent accept).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memzoo
from memzoo.registry import memory_config
from memzoo.training import TrainConfig
from memzoo.training.evolution import EvolutionConfig
from memzoo.validation import bounds, check_fields

TINY = dict(d_model=16, n_layers=1, n_heads=2)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: memzoo.build("full", d_model=32, n_heads=0), "n_heads must be >= 1, got 0"),
        (lambda: memzoo.build("full", n_layers=-1), "n_layers must be >= 1, got -1"),
        (lambda: memzoo.build("full", norm_eps=-1e-6), "norm_eps must be > 0"),
        (lambda: memzoo.build("full", rope_theta=0), "rope_theta must be > 1, got 0"),
        (lambda: memzoo.build("infini", gate_init=float("nan")), "gate_init must be a finite number, got nan"),
        (lambda: memzoo.build("titans-lmm", stop_inner_grad="no"), "stop_inner_grad must be a bool, got 'no'"),
        (lambda: memzoo.build("window", budget=True), "budget must be an int, got True"),
        (lambda: memzoo.build("titans-mac", max_lr=float("inf")), "max_lr must be a finite number, got inf"),
        (lambda: memzoo.build("infini", update_rule="gated"), "update_rule must be one of 'delta', 'linear', 'deltanet'"),
        (lambda: TrainConfig(lr=float("inf")), "TrainConfig.lr must be a finite number"),
        (lambda: TrainConfig(betas=(0.9, 1.0)), r"betas\[1\] must be < 1"),
        (lambda: EvolutionConfig(popsize=1), "popsize must be >= 2"),
    ],
)
def test_a_bad_config_field_is_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bounds_cover_every_comparison():
    @dataclasses.dataclass
    class Knobs:
        a: int = dataclasses.field(default=1, metadata=bounds(ge=1, lt=3))
        b: float | None = dataclasses.field(default=None, metadata=bounds(gt=0, le=1))

        def __post_init__(self):
            check_fields(self)

    Knobs(a=2, b=1.0)
    Knobs(b=1)  # an int is a fine float
    for kwargs, match in [({"a": 0}, "a must be >= 1"), ({"a": 3}, "a must be < 3"), ({"b": 0.0}, "b must be > 0"),
                          ({"b": 1.5}, "b must be <= 1"), ({"a": 1.0}, "a must be an int"), ({"b": "x"}, "b must be a float")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"Knobs.{match}"):
            Knobs(**kwargs)


def test_inputs_are_checked():
    model = memzoo.build("full", **TINY).eval()
    ids = torch.randint(3, 200, (2, 8))
    with pytest.raises(ValueError, match="batch size 0"):
        model(ids[:0])
    with pytest.raises(ValueError, match="no label after the first position"):
        model(ids, labels=torch.full_like(ids, -100))
    with pytest.raises(ValueError, match="no label after the first position"):
        model.stream(ids, segment_len=4, labels=torch.full_like(ids, -100))
    with pytest.raises(TypeError, match="labels must be integer token ids"):
        model(ids, labels=ids.roll(1).float())
    with pytest.raises(ValueError, match="the state holds .*float64"):
        model.init_state(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    labels = ids.clone()
    # integer ids and labels of any width are token ids: the same numbers as int64
    want = model(ids, labels=labels)
    got = model(ids.to(torch.uint8), labels=labels.int())
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)  # the same int64 ids reach the same ops
    torch.testing.assert_close(got.loss, want.loss, atol=0, rtol=0)


def test_hidden_states_follow_transformers():
    model = memzoo.build("window", d_model=16, n_layers=3, n_heads=2).eval()
    ids = torch.randint(3, 200, (1, 8))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and all(h.shape == (1, 8, 16) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.embed(ids), atol=0, rtol=0)  # the same op on the same ids
    # the last through the final norm: the head's input, so the logits follow from it by one matmul
    last = out.hidden_states[-1]
    head = model.head(last) if model.head is not None else last @ model.embed.weight.T  # as the model computes its logits
    torch.testing.assert_close(head, out.logits, atol=0, rtol=0)
    assert model(ids).hidden_states is None
    loss, logits, *_ = model(ids, labels=ids, return_dict=False)
    assert logits.shape == (1, 8, 259) and loss.ndim == 0


# ------------------------------------------------------------------------------------ fuzzing
def _values(kind, meta: dict) -> st.SearchStrategy:
    """Right and wrong values for a field annotated ``kind`` (with its declared bounds)."""
    wrong = st.sampled_from([True, "no", None, 1.5, -1, float("nan"), float("inf")])
    options = typing.get_args(kind) or (kind,)
    if "choices" in meta:
        return st.one_of(st.sampled_from(meta["choices"]), st.just("bogus"), wrong)
    if bool in options:
        return st.one_of(st.booleans(), wrong)
    if int in options:
        return st.one_of(st.integers(-2, 40), wrong)
    if float in options:
        return st.one_of(st.floats(-2.0, 2.0), st.floats(0.0, 1.0), wrong)
    return wrong


@st.composite
def _design_overrides(draw, name: str) -> dict:
    config = memory_config(name)
    hints = typing.get_type_hints(type(config))
    fields = [f for f in dataclasses.fields(config) if f.init]
    chosen = draw(st.lists(st.sampled_from(fields), max_size=3, unique_by=lambda f: f.name)) if fields else []
    return {f.name: draw(_values(hints[f.name], f.metadata.get("bounds", {}))) for f in chosen}


@pytest.mark.parametrize("name", memzoo.available())
def test_fuzzed_design_configs_raise_a_named_error_or_compute_finite_logits(name):
    @FUZZ
    @given(_design_overrides(name), st.sampled_from([None, None, None, 0, 1, 3]), st.sampled_from([16, 16, 16, 4, 16.0, 0]))
    def check(overrides, n_heads, d_model):
        backbone = dict(TINY) | ({"n_heads": n_heads} if n_heads is not None else {}) | {"d_model": d_model}
        try:
            model = memzoo.build(name, **backbone, **overrides)
        except (ValueError, TypeError) as error:
            named = [k for k in (*overrides, "n_heads", "d_model") if k in str(error)]
            assert named, f"{name} {overrides} {backbone}: the error names no field: {error}"
            return
        torch.manual_seed(0)
        ids = torch.randint(3, 200, (2, 21))
        with torch.no_grad():
            state, outs = model.init_state(2), []
            for piece in ids.split(8, dim=1):
                out = model(piece, state=state)
                state, outs = out.state, outs + [out.logits]
        logits = torch.cat(outs, dim=1)
        assert logits.shape == (2, 21, 259) and torch.isfinite(logits).all(), f"{name} {overrides} {backbone}"

    check()


_DTYPES = [torch.int64, torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]
_IDS = st.one_of(
    st.builds(lambda b, n, dtype, hi: torch.randint(0, hi, (b, n)).to(dtype), st.sampled_from([1, 1, 2, 0]), st.sampled_from([5, 5, 1, 0]),
              st.sampled_from(_DTYPES), st.sampled_from([200, 200, 259, 300])),
    st.builds(lambda n: torch.randint(0, 200, (n,)), st.integers(1, 4)),  # 1-D
    st.just([1, 2, 3]),
)  # fmt: skip


@pytest.mark.parametrize("name", memzoo.available())
def test_fuzzed_inputs_raise_a_clear_error_or_compute_finite_logits(name):
    torch.manual_seed(0)
    model = memzoo.build(name, **TINY).eval()

    @FUZZ
    @given(_IDS, st.sampled_from(["none", "ids", "shifted", "ignored", "short"]), st.sampled_from([None, 1, 2, "fp64"]))
    def check(ids, labels_kind, state_kind):
        try:
            labels = None
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                labels = {"none": None, "ids": ids, "shifted": ids.roll(-1, dims=1), "ignored": torch.full_like(ids, -100),
                          "short": ids[:, :-1]}[labels_kind]  # fmt: skip
            state = None
            if state_kind == "fp64":
                state = model.init_state(1, dtype=torch.float64)
            elif state_kind is not None:
                state = model.init_state(state_kind)
            with torch.no_grad():
                out = model(ids, state=state, labels=labels)
        except (ValueError, TypeError) as error:
            assert len(str(error)) > 20, f"{name}: too terse to act on: {error!r}"
            return
        assert torch.isfinite(out.logits).all()
        assert out.loss is None or math.isfinite(float(out.loss))

    check()
