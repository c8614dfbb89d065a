"""memzoo models follow transformers' causal-LM contract: unshifted labels, attention_mask, Trainer.

Tolerances come from tests/tolerance.py (fp32; the operation's longest reduction and depth).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

import memzoo
from memzoo.model import IGNORE_INDEX

TINY = dict(d_model=32, n_layers=2, n_heads=2)


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (b, n), generator=torch.Generator().manual_seed(seed))


def test_shift_labels_aligns_targets_with_logits():
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    assert memzoo.shift_labels(labels).tolist() == [[6, 7, -100], [8, 9, -100]]
    mask = torch.tensor([[True, False, True]])
    assert memzoo.shift_labels(mask, False).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        memzoo.shift_labels(labels[0])


def test_labels_are_shifted_inside_like_transformers():
    torch.manual_seed(0)
    model = memzoo.build("full", **TINY).eval()
    x = ids(2, 12)
    labels = x.clone()
    labels[:, :5] = IGNORE_INDEX  # a masked prompt
    out = model(x, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert_close(out.loss, expected, n=x.shape[1])
    # num_items_in_batch (gradient accumulation): a sum over the scored tokens divided by the count given
    summed = model(x, labels=labels, num_items_in_batch=100).loss
    assert_close(summed, expected * int((labels[:, 1:] != IGNORE_INDEX).sum()) / 100, n=x.shape[1])
    with pytest.raises(ValueError, match="no label after the first position"):
        model(x[:, :1], labels=x[:, :1])


def test_stream_scores_every_boundary_prediction():
    """One call loses no prediction inside it; a stream in 4-token segments loses none at the cuts either."""
    torch.manual_seed(0)
    model = memzoo.build("full", **TINY).eval()
    x = ids(2, 16)
    with torch.no_grad():
        whole = model(x, labels=x).loss
    streamed = model.stream(x, 4, labels=x).loss
    assert_close(streamed, whole, n=max(model.config.d_ff, x.shape[1]), depth=model.config.n_layers)


@pytest.mark.parametrize("name", ["full", "titans-mac", "infini"])
def test_attention_mask_all_ones_and_right_padding(name):
    torch.manual_seed(0)
    model = memzoo.build(name, **TINY).eval()
    x = ids(2, 10)
    ones = torch.ones_like(x)
    with torch.no_grad():
        plain = model(x)
        masked = model(x, attention_mask=ones)
        assert torch.equal(plain.logits, masked.logits)  # the same ops on the same inputs
        assert masked.state is not None
        pad = ones.clone()
        pad[1, 7:] = 0  # row 1 right-padded: its real tokens never see the pads (causal)
        padded = model(x, attention_mask=pad)
    assert torch.equal(padded.logits, plain.logits) and padded.state is None  # the state has read the pads
    left = ones.clone()
    left[0, :3] = 0
    with pytest.raises(ValueError, match="left padding or holes"):
        model(x, attention_mask=left)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(x, attention_mask=ones[:, :5])


@pytest.mark.parametrize("name", ["full", "titans-mac"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = memzoo.build(name, **TINY).train()
    x = ids(2, 24)

    def grads():
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert all(blk.gradient_checkpointing for blk in model.blocks)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for key in plain:  # the recompute runs the same ops again: bit-identical by construction on a CPU
        assert torch.equal(plain[key], checkpointed[key]), key


def test_transformers_trainer_learns_the_next_token(tmp_path):
    """transformers.Trainer with labels = input_ids (its collator's convention) must learn to predict
    the *next* token. Under memzoo's earlier pre-shifted labels it learned to copy the current one."""
    import transformers  # Trainer needs accelerate, a dev dependency
    torch.manual_seed(0)
    model = memzoo.build("full", **TINY)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(10, 30, (256,), generator=gen)
    rows = [torch.arange(s, s + 12) for s in starts]  # counting: the next token is always this one + 1
    data = [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    x = torch.stack([torch.arange(s, s + 12) for s in (12, 20, 25)])
    with torch.no_grad():
        pred = model(x).logits.argmax(-1)[:, :-1]
    next_right = float((pred == x[:, 1:]).float().mean())
    copies = float((pred == x[:, :-1]).float().mean())
    assert next_right > 0.9 and copies < 0.1, (next_right, copies)



def test_trust_remote_code_opens_a_checkpoint_without_importing_memzoo(tmp_path):
    """config.json's auto_map names two files the checkpoint carries; a fresh interpreter that never
    imports memzoo itself gets the same model (same logits) from AutoModelForCausalLM."""
    import json
    import subprocess
    import sys

    torch.manual_seed(0)
    model = memzoo.build("titans-mac", **TINY).eval()
    model.save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_memzoo.MemZooConfig", "AutoModelForCausalLM": "modeling_memzoo.MemZooForCausalLM"}
    x = ids(1, 12)
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "memzoo" not in sys.modules
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert torch.equal(model(expected["x"]).logits, expected["logits"]), "other logits"
print(type(model).__name__)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("MemZooForCausalLM")


def test_shipped_checkpoints_carry_auto_map_and_a_generation_config():
    """What save_pretrained writes today (recipes/refresh_checkpoint_metadata.py adds it to older folders)."""
    import json
    from pathlib import Path

    folders = [f for f in sorted((Path(__file__).parents[1] / "checkpoints").iterdir()) if (f / "model.safetensors").exists()]
    assert len(folders) >= 10
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert set(config.get("auto_map", {})) == {"AutoConfig", "AutoModelForCausalLM"}, folder.name
        for file in ("configuration_memzoo.py", "modeling_memzoo.py", "generation_config.json"):
            assert (folder / file).exists(), f"{folder.name} lacks {file}"
