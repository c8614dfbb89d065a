"""The conformance suite: every name in `memzoo.available()` passes the same checks.

Adding a design means passing this file, nothing else. Designs are built tiny: backbone overrides
plus the small values below for any standard knob the design's config has (a design that uses the
standard names for its segment length, budget, chunk size... gets exercised across its own
boundaries with short streams).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerance import assert_close

import memzoo
from memzoo.registry import memory_config

TINY = dict(d_model=32, n_layers=2, n_heads=2)
# Standard knob names -> small values, so that ~100 tokens cross several segments/evictions.
SMALL_KNOBS = dict(budget=16, evict_every=8, segment_len=8, chunk_size=4, window=8, n_persistent=2)
BOUNDED = [name for name in memzoo.available() if name != "full"]


def tiny(name: str, **extra):
    fields = {f.name for f in dataclasses.fields(memory_config(name))}
    knobs = {k: v for k, v in SMALL_KNOBS.items() if k in fields}
    torch.manual_seed(0)
    return memzoo.build(name, **TINY, **knobs, **extra)


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (b, n), generator=torch.Generator().manual_seed(seed))


def stream_op(model, n_tokens: int) -> dict:
    """Rounding of ``model`` over a stream of ``n_tokens``, for the tolerance helper: the longest
    reduction is the FFN's (d_ff) or a sum over the stream's tokens (attention, a memory), once per layer."""
    return dict(n=max(model.config.d_ff, n_tokens), depth=model.config.n_layers)


def run_split(model, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of ``x`` fed in pieces ending at ``cuts``."""
    state, outs, start = model.init_state(x.shape[0]), [], 0
    for end in [*cuts, x.shape[1]]:
        if end > start:
            out = model(x[:, start:end], state=state)
            state, start = out.state, end
            outs.append(out.logits)
    return torch.cat(outs, dim=1)


@pytest.fixture(params=memzoo.available())
def name(request):
    return request.param


def test_available_lists_the_foundation():
    assert {"full", "window", "sinks"} <= set(memzoo.available())
    assert memzoo.available() == sorted(memzoo.available())


def test_shapes(name):
    model = tiny(name)
    out = model(ids(2, 20))
    assert out.logits.shape == (2, 20, model.config.vocab_size)
    assert out.state.batch_size == 2 and out.state.position == 20
    assert len(out.state.layers) == model.config.n_layers
    assert torch.isfinite(out.logits).all()


def test_split_invariance(name):
    """One call, random cuts and token-by-token give the same outputs (fp32, to rounding: tests/tolerance.py)."""
    model = tiny(name).eval()
    x = ids(2, 67)
    with torch.no_grad():
        whole = model(x).logits
        cuts = sorted(torch.randperm(66, generator=torch.Generator().manual_seed(1))[:9].add(1).tolist())
        assert_close(run_split(model, x, cuts), whole, **stream_op(model, 67))
        assert_close(run_split(model, x[:, :20], list(range(1, 20))), whole[:, :20], **stream_op(model, 20))


def test_full_one_segment_equals_eight():
    model = tiny("full").eval()
    x = ids(2, 64)
    with torch.no_grad():
        assert_close(run_split(model, x, list(range(8, 64, 8))), model(x).logits, **stream_op(model, 64))


def test_causality(name):
    """Changing token j leaves every output before j unchanged (and changes output j)."""
    model = tiny(name).eval()
    x = ids(1, 48)
    j = 29
    y = x.clone()
    y[0, j] = (x[0, j] - 3 + 100) % 256 + 3
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    # bit for bit: both calls run the same ops on the same shapes, and token j reaches an earlier
    # output only through masked terms, which are exact zeros; any difference is the future leaking
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=0, rtol=0)
    assert not torch.allclose(a[:, j], b[:, j])


def test_state_tensors_are_batch_first(name):
    """The convention that lets detach/expand_batch work generically: dim 0 of every tensor is b."""
    model = tiny(name).eval()
    with torch.no_grad():
        state = model(ids(3, 21)).state
    shapes = [tuple(t.shape) for t in _tensors(state)]
    assert shapes and all(s[0] == 3 for s in shapes), shapes


def test_expand_batch_equals_repeated_rows(name):
    """One context streamed once, then expanded, continues like the batch streamed row by row."""
    model = tiny(name).eval()
    ctx, tails = ids(1, 26), ids(2, 11, seed=5)
    with torch.no_grad():
        shared = model(ctx).state.expand_batch(2)
        got = model(tails, state=shared).logits
        want = model(torch.cat([ctx.expand(2, -1), tails], dim=1)).logits[:, 26:]
    assert_close(got, want, **stream_op(model, 26 + 11))


def test_state_is_not_modified(name):
    """State in, state out: feeding the same state twice gives the same result."""
    model = tiny(name).eval()
    with torch.no_grad():
        state = model(ids(1, 30)).state
        first = model(ids(1, 9, seed=1), state=state).logits
        second = model(ids(1, 9, seed=1), state=state).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # the same ops on the same inputs: bit for bit


@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_state(name):
    """state.nbytes() is identical after 10 and after 200 segments."""
    model = tiny(name).eval()
    state = model.init_state(1)
    sizes = {}
    with torch.no_grad():
        for i in range(200):
            state = model(ids(1, 5, seed=i), state=state).state
            if i + 1 in (10, 200):
                sizes[i + 1] = state.nbytes()
    assert sizes[10] == sizes[200] > 0


def test_full_state_grows():
    model = tiny("full").eval()
    with torch.no_grad():
        small = model(ids(1, 10)).state.nbytes()
        big = model(ids(1, 300)).state.nbytes()
    assert big > small


def test_detach_cuts_the_graph(name):
    model = tiny(name)
    state = model(ids(1, 20)).state
    detached = state.detach()
    leaves = [t for t in _tensors(detached)]
    assert leaves and all(t.grad_fn is None and not t.requires_grad for t in leaves)
    assert detached.nbytes() == state.nbytes()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_every_parameter_gets_a_gradient(name):
    """Two segments, so that paths through the memory state are used too. At the very first step a
    design may hide parameters behind a zero-initialised output (infini-deltanet's memory output,
    so that a warm start is its backbone): only those, and after one SGD step none."""
    model = tiny(name)
    x = ids(2, 41)

    def missing_gradients() -> list[str]:
        model.zero_grad()
        first = model(x[:, :20], labels=x[:, :20])
        second = model(x[:, 20:40], state=first.state, labels=x[:, 20:40])
        (first.loss + second.loss).backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]

    zero_output = any(getattr(block.mixer, "mem_out", None) is not None for block in model.blocks)
    missing = missing_gradients()
    hidden = [n for n in missing if zero_output and ".mixer.strength." in n]  # only the memory's write strengths feed W_mem = 0 alone
    assert missing == hidden, f"no gradient reaches {sorted(set(missing) - set(hidden))}"
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    missing = missing_gradients()
    assert not missing, f"no gradient reaches {missing}"


def test_save_load_roundtrip(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny(name).eval()
    x = ids(1, 25)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".ckpt*")), "temporary folders left behind"
    loaded = memzoo.load(tmp_path / "ckpt")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():  # the weights come back bit for bit, so the same computation runs
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(auto(x).logits, expected, atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.decode(tok("pass key 42", add_special_tokens=False)["input_ids"]) == "pass key 42"


def test_generate_matches_step_by_step(name):
    model = tiny(name).eval()
    prompt = ids(1, 23)
    out = model.generate(prompt, max_new_tokens=5, segment_len=7)
    assert out.shape == (1, 28) and torch.equal(out[:, :23], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


# ------------------------------------------------------------------------- bad inputs
def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean 'window'.*available"):
        memzoo.build("windw")


def test_unknown_override_lists_valid_keys():
    with pytest.raises(TypeError, match="unknown option.*'bogus'.*valid:.*d_model"):
        memzoo.build("window", bogus=1)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.rand(1, 5), TypeError, "integer token ids"),
        (torch.zeros(1, 5, 2, dtype=torch.long), ValueError, "2-D"),
        (torch.zeros(5, dtype=torch.long), ValueError, "2-D"),
        (torch.full((1, 5), 259), ValueError, r"\[0, 259\)"),
        (torch.full((1, 5), -1), ValueError, r"\[0, 259\)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    ],
)
def test_bad_input_ids(name, bad, error, match):
    with pytest.raises(error, match=match):
        tiny(name)(bad)


def test_state_of_another_batch_size(name):
    model = tiny(name)
    with pytest.raises(ValueError, match="batch size 3"):
        model(ids(2, 5), state=model.init_state(3))


def test_pre_shifted_labels_are_caught():
    """memzoo's convention before transformers' was pre-shifted labels; such labels must not train silently."""
    model = tiny("full")
    x = ids(1, 10)
    with pytest.raises(ValueError, match="pre-shifted"):
        model(x[:, :-1], labels=x[:, 1:])
    masked = x[:, 1:].clone()
    masked[:, :4] = -100  # a prompt masked out, as a collator does: still pre-shifted
    with pytest.raises(ValueError, match="pre-shifted"):
        model(x[:, :-1], labels=masked)


# ------------------------------------------------------------------------------ the memory-off control
# Per layer, how far back a token can see with its memory off: the cache (budget + evict_every), the
# segment or window, the short convolution of Titans. Two layers: twice that. 200 tokens clear it.
LOCAL_REACH = 2 * (SMALL_KNOBS["budget"] + SMALL_KNOBS["evict_every"] + 4)
KEEPS_TOKEN_ZERO = ["sinks", "infini", "infini-linear", "titans-lmm", "titans-mac", "titans-mag", "titans-mal"]


@pytest.mark.parametrize("name", BOUNDED)
def test_memory_off_leaves_nothing_from_beyond_the_local_context(name):
    """With the memory off, the first tokens of a 200-token stream cannot change its last logits (they
    lie beyond every layer's local context); with it on, a design that keeps them does change them."""
    model = tiny(name).eval()
    x = ids(1, 200)
    y = x.clone()
    y[:, :10] = ids(1, 10, seed=1)  # a different start, far outside the local reach of the last tokens
    assert 200 - 20 > LOCAL_REACH + 10
    with torch.no_grad():
        with memzoo.memory_off(model):
            off = [model.stream(t, 64).logits[:, -20:] for t in (x, y)]
        on = [model.stream(t, 64).logits[:, -20:] for t in (x, y)]
    torch.testing.assert_close(off[0], off[1], atol=0, rtol=0)  # the same ops on the same local inputs: bit for bit
    with torch.no_grad(), memzoo.memory_off(model):  # and the state stays bounded with the memory off too
        sizes = [model.stream(x[:, :n], 64).state.nbytes() for n in (100, 200)]
    assert sizes[0] == sizes[1]
    if name in KEEPS_TOKEN_ZERO:
        assert not torch.equal(on[0], on[1])  # the memory carried the start (the test can fail)
    if name == "window":  # a window has no memory beyond its cache: its control is itself
        torch.testing.assert_close(on[0], on[1], atol=0, rtol=0)


def test_memory_off_is_restored_and_refused_where_there_is_no_memory():
    model = tiny("infini").eval()
    x = ids(1, 40)
    with torch.no_grad():
        before = model.stream(x, 16).logits
        with memzoo.memory_off(model) as same:
            assert same is model
            assert all(m.memory_off for m in model.modules() if isinstance(m, memzoo.MemoryModule))
            off = model.stream(x, 16).logits
        after = model.stream(x, 16).logits
    assert not torch.equal(before, off)  # segments after the first read the memory when it is on
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert not any(m.memory_off for m in model.modules() if hasattr(m, "memory_off"))
    with pytest.raises(ValueError, match="'full' has no memory to switch off"):
        with memzoo.memory_off(tiny("full")):
            pass
    with pytest.raises(ValueError, match="no memzoo memory modules"):
        with memzoo.memory_off(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("name", ["titans-mag", "infini"])
def test_memory_off_writes_nothing_into_the_state(name):
    """The compressive and neural memories stay as they started: M = 0 (Infini), M = M_0 and S = 0 (Titans)."""
    model = tiny(name).eval()
    with torch.no_grad(), memzoo.memory_off(model):
        state = model.stream(ids(1, 37), 16).state
    for layer, block in zip(state.layers, model.blocks):
        if name == "infini":
            assert float(layer.M.abs().max()) == 0.0 and float(layer.z.abs().max()) == 0.0
        else:
            memory = layer.memory
            for w, w0 in zip(memory.weights, block.mixer.memory.init_weights):
                torch.testing.assert_close(w, w0.expand_as(w), atol=0, rtol=0)
            assert all(float(s.abs().max()) == 0.0 for s in memory.momentum)
