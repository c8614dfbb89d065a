"""Nothing silently wrong: divergence that stops before a bad save, states checked against their model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import memzoo
from memzoo.training import TrainConfig, Trainer

TINY = dict(d_model=32, n_layers=2, n_heads=2)


def batches(step: int, generator: torch.Generator) -> dict:
    seq = torch.randint(3, 40, (4, 25), generator=generator)
    return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_huge_learning_rate_stops_before_saving_non_finite_weights(tmp_path, grad_clip):
    model = memzoo.build("window", **TINY, budget=8, evict_every=4)
    config = TrainConfig(steps=6, lr=1e30, warmup_steps=0, segment_len=8, grad_clip=grad_clip, save_every=1, log_every=1)
    trainer = Trainer(model, config, batches, out_dir=tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d.*lower train.lr"):
        trainer.fit(progress=False)
    last = tmp_path / "run" / "last"
    if (last / "trainer_state.json").is_file():  # whatever was saved is finite
        step = json.loads((last / "trainer_state.json").read_text())["step"]
        assert step < trainer.step + 1
        weights = load_file(str(last / "model" / "model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.parametrize(
    "made_by, used_by, named",
    [
        (("infini", dict(segment_len=64)), ("infini", dict(segment_len=32)), "memory_config.segment_len: state 64, model 32"),
        (("window", dict(budget=32)), ("window", dict(budget=16)), "memory_config.budget: state 32, model 16"),
        (("titans-mal", dict(window=8)), ("titans-mag", dict(window=8)), "memory: state 'titans-mal', model 'titans-mag'"),
        (("infini", {}), ("window", {}), "memory: state 'infini', model 'window'"),
    ],
)
def test_a_state_made_for_another_model_is_refused(made_by, used_by, named):
    (a, a_kw), (b, b_kw) = made_by, used_by
    maker, user = memzoo.build(a, **TINY, **a_kw), memzoo.build(b, **TINY, **b_kw)
    ids = torch.randint(3, 40, (1, 9))
    state = maker(ids).state
    with pytest.raises(ValueError, match=rf"made for another model \(.*{named}.*model.init_state\(1\)"):
        user(ids, state=state)
    user(ids, state=user.init_state(1))  # its own state is fine
    user(ids, state=user(ids).state.detach())  # and stays so through detach
