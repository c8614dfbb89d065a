"""Loading is strict: a checkpoint whose weights and config disagree raises, naming the keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import memzoo

TINY = dict(d_model=32, n_layers=2, n_heads=2)


@pytest.fixture
def ckpt(tmp_path):
    memzoo.build("window", **TINY, budget=16, evict_every=8).save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def drop_tensor(path, name):
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "corrupt, kind, key",
    [
        (lambda p: drop_tensor(p, "blocks.1.mixer.out.weight"), "missing keys", "blocks.1.mixer.out.weight"),
        (lambda p: edit_config(p, n_layers=3), "missing keys", "blocks.2."),
        (lambda p: edit_config(p, n_layers=1), "unexpected keys", "blocks.1."),
        (lambda p: edit_config(p, tie_word_embeddings=False), "missing keys", "head.weight"),
    ],
    ids=["deleted-tensor", "more-layers", "fewer-layers", "untied-head"],
)
def test_a_checkpoint_that_disagrees_with_its_config_raises(ckpt, corrupt, kind, key):
    corrupt(ckpt)
    for load in (memzoo.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"does not match its config.json \({kind} .*{key}"):
            load(ckpt)


def test_a_whole_checkpoint_loads_and_can_report_its_loading_info(ckpt):
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = memzoo.load(ckpt)
    # exact: the same tensors read from the same file
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_saving_and_loading_print_no_transformers_progress_bar(tmp_path, capsys):
    """A training run saves every few steps: transformers' per-save bars would flood its log."""
    from transformers.utils import logging as hf_logging

    model = memzoo.build("full", d_model=32, n_layers=1, n_heads=2)
    model.save_pretrained(tmp_path / "m")
    memzoo.load(tmp_path / "m")
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()  # switched off for the block only
