"""param_groups: decay rules, optim_overrides, and use by a real optimizer."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close
from torch import nn

import memzoo
from memzoo.training.param_groups import param_groups


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["names"]}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: no decay
        self.inner = nn.Module()
        self.inner.gate = nn.Parameter(torch.zeros(3))
        self.inner.mat = nn.Parameter(torch.zeros(3, 3))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_default_rules():
    groups = by_name(param_groups(Toy(), lr=1e-3, weight_decay=0.1))
    assert set(groups) == {"embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias", "scale", "inner.gate", "inner.mat"}
    decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.1}
    assert decayed == {"proj.weight", "inner.mat"}
    assert all(g["lr"] == 1e-3 and g["lr_mult"] == 1.0 for g in groups.values())


def test_overrides_win_and_nested_names_resolve():
    model = Toy()
    model.optim_overrides = {"inner.mat": {"lr_mult": 3.0}}  # decay stays the default rule's (0.1)
    model.inner.optim_overrides = {"gate": {"lr_mult": 10.0, "weight_decay": 0.0}}
    model.proj.optim_overrides = {"bias": {"weight_decay": 0.5}}  # even a bias, if asked
    groups = by_name(param_groups(model, lr=2e-3, weight_decay=0.1))
    assert (groups["inner.mat"]["lr"], groups["inner.mat"]["weight_decay"]) == (6e-3, 0.1)
    assert (groups["inner.gate"]["lr"], groups["inner.gate"]["lr_mult"], groups["inner.gate"]["weight_decay"]) == (2e-2, 10.0, 0.0)
    assert (groups["proj.bias"]["lr"], groups["proj.bias"]["weight_decay"]) == (2e-3, 0.5)


@pytest.mark.parametrize(
    "overrides, match",
    [({"nope": {"lr_mult": 2.0}}, "not one of its parameters"), ({"scale": {"lr": 2.0}}, "unknown key")],
)
def test_malformed_overrides_say_what_is_wrong(overrides, match):
    model = Toy()
    model.optim_overrides = overrides
    with pytest.raises(ValueError, match=match):
        param_groups(model, lr=1e-3, weight_decay=0.1)


def test_infini_model_groups_and_adamw_step():
    """Every parameter exactly once (tied head included); the gates get 10x lr and no decay."""
    model = memzoo.build("infini", d_model=32, n_layers=2, n_heads=2, segment_len=8)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    g = by_name(groups)
    assert (g["blocks.0.mixer.beta"]["lr"], g["blocks.0.mixer.beta"]["weight_decay"]) == (1e-2, 0.0)
    assert g["embed.weight"]["weight_decay"] == 0.0 and g["blocks.1.mixer_norm.weight"]["weight_decay"] == 0.0
    assert g["blocks.1.mixer.qkv.weight"]["weight_decay"] == 0.1
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    x = torch.randint(3, 259, (1, 17))
    model(x, labels=x).loss.backward()
    beta = model.blocks[0].mixer.beta
    before = beta.detach().clone()
    opt.step()
    # AdamW's first step moves each parameter by lr |g| / (|g| + eps) (m and v are g and g^2 once
    # bias-corrected), about lr: 10x for the gates (and no decay). A few elementwise ops, each
    # rounded once: the default n = depth = 1.
    g = beta.grad.abs()
    assert_close((beta.detach() - before).abs(), 1e-2 * g / (g + opt.defaults["eps"]))
