"""The trainer: exact resume, truncated BPTT, data parallel equal to one process."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memzoo
from memzoo.training import TrainConfig, Trainer

TINY = dict(d_model=32, n_layers=2, n_heads=2)


def random_batches(batch_size: int = 4, n: int = 24):
    def batch_fn(step: int, generator: torch.Generator) -> dict:
        seq = torch.randint(3, 40, (batch_size, n + 1), generator=generator)
        weights = torch.rand(batch_size, n, generator=generator)
        return {"input_ids": seq[:, :-1], "labels": seq[:, 1:], "loss_weights": weights}

    return batch_fn


def make(name: str = "window", **overrides):
    torch.manual_seed(0)
    return memzoo.build(name, **TINY, **overrides)


def config(**kw) -> TrainConfig:
    base = dict(steps=4, lr=1e-2, warmup_steps=2, segment_len=8, autocast="none", log_every=1, save_every=2)
    return TrainConfig(**{**base, **kw})


def test_resume_continues_exactly(tmp_path):
    straight = make(budget=8, evict_every=4)
    Trainer(straight, config(), random_batches(), out_dir=tmp_path / "a").fit(progress=False)

    interrupted = make(budget=8, evict_every=4)
    Trainer(interrupted, config(steps=2), random_batches(), out_dir=tmp_path / "b").fit(progress=False)
    resumed = make(budget=8, evict_every=4)  # a fresh process would rebuild the model like this
    trainer = Trainer(resumed, config(), random_batches(), out_dir=tmp_path / "b")
    with pytest.warns(UserWarning, match="steps 2 -> 4"):  # warm-up only so far: the same schedule
        trainer.fit(progress=False)
    assert trainer.step == 4
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    losses = lambda run: [json.loads(ln)["loss"] for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("a") == losses("b")
    assert (tmp_path / "b" / "last" / "optimizer.safetensors").is_file()


def test_segmented_full_bptt_gradient_equals_one_call():
    """Back-propagating through the memory state across segments gives the one-call gradient."""
    batch = random_batches()(0, torch.Generator().manual_seed(0))
    grads = []
    for segment_len in (24, 5):
        model = make("full")
        trainer = Trainer(model, config(segment_len=segment_len, grad_clip=0.0, lr=0.0), lambda s, g: batch)
        trainer.train_step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_truncation_cuts_gradients_through_memory():
    batch = random_batches()(0, torch.Generator().manual_seed(0))
    grads = []
    for bptt in (0, 1):
        model = make("full")
        Trainer(model, config(segment_len=6, bptt_segments=bptt, grad_clip=0.0, lr=0.0), lambda s, g: batch).train_step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_no_grad_prefix_streams_without_gradient():
    batch = random_batches(n=30)(0, torch.Generator().manual_seed(0))
    model = make("full")
    metrics = Trainer(model, config(no_grad_prefix=20, lr=0.0), lambda s, g: batch).train_step()
    assert metrics["loss"] > 0 and all(p.grad is not None for p in model.parameters())


def test_metric_masks_log_mean_cross_entropy_across_segments():
    batch = random_batches()(0, torch.Generator().manual_seed(0))
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, 3] = mask[:, 20] = True  # one prediction in the first segment, one in the third
    batch["metric_masks"] = {"probe": mask}
    model = make("full")
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits[mask], batch["labels"][mask])
    metrics = Trainer(model, config(segment_len=8, lr=0.0), lambda s, g: batch).train_step()
    assert metrics["ce_probe"] == pytest.approx(float(expected), rel=1e-5)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert cfg.lr_at(10) > cfg.lr_at(50) > cfg.lr_at(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make(budget=8, evict_every=4)
    Trainer(model, config(steps=2, save_every=0), random_batches()).fit(progress=False)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = make(budget=8, evict_every=4)
    Trainer(single, config(steps=2, save_every=0), random_batches()).fit(progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, p in single.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=0, rtol=0)  # ranks identical
        torch.testing.assert_close(ranks[0][name], p, atol=1e-6, rtol=1e-5)  # = one process


def test_warm_start_copies_the_shared_backbone(tmp_path):
    from memzoo.training import warm_start

    source = make("full")
    source.save_pretrained(tmp_path / "full")
    target = make("infini", segment_len=8)
    torch.manual_seed(1)
    report = warm_start(target, tmp_path / "full")
    own = dict(target.named_parameters())
    assert set(report["copied"]) == {name for name, _ in source.named_parameters()}
    assert report["kept_init"] and set(report["kept_init"]).isdisjoint(report["copied"])
    for name, param in source.named_parameters():
        torch.testing.assert_close(own[name], param, atol=0, rtol=0)

    wider = memzoo.build("full", d_model=64, n_layers=2, n_heads=2)
    with pytest.raises(ValueError, match="same d_model"):
        warm_start(wider, tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        warm_start(target, tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["titans-mac", "titans-mag", "titans-mal"])
def test_warm_start_maps_attention_onto_titans_softmax_branch(tmp_path, name):
    from memzoo.training import warm_start

    source = make("full")
    source.save_pretrained(tmp_path / "full")
    target = make(name, chunk_size=4, **({"segment_len": 8} if name == "titans-mac" else {"window": 8}))
    report = warm_start(target, tmp_path / "full")
    own, src = dict(target.named_parameters()), dict(source.named_parameters())
    qkv = src["blocks.1.mixer.qkv.weight"]
    proj = "attn." if name == "titans-mac" else "attn.proj."
    torch.testing.assert_close(own[f"blocks.1.mixer.{proj}q.weight"], qkv[:32], atol=0, rtol=0)
    torch.testing.assert_close(own[f"blocks.1.mixer.{proj}kv.weight"], qkv[32:], atol=0, rtol=0)
    assert "blocks.1.mixer.memory.qkv.weight" in report["kept_init"]  # the neural memory learns from scratch


def test_resuming_with_other_settings_is_refused(tmp_path):
    Trainer(make("full"), config(steps=2), random_batches(), out_dir=tmp_path).fit(progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 -> 0.02\)"), pytest.warns(UserWarning):
        Trainer(make("full"), config(steps=4, lr=2e-2), random_batches(), out_dir=tmp_path).fit(progress=False)
    # a longer time limit is fine: it does not change what is computed
    trainer = Trainer(make("full"), config(steps=2, max_minutes=5), random_batches(), out_dir=tmp_path)
    trainer.fit(progress=False)
    assert trainer.step == 2


def test_divergence_stops_before_the_weights_turn_nan(tmp_path):
    good = random_batches()

    def batch_fn(step: int, generator: torch.Generator) -> dict:
        batch = good(step, generator)
        if step == 2:  # the third step's loss is NaN
            batch["loss_weights"][0, 0] = float("nan")
        return batch

    model = make(budget=8, evict_every=4)
    trainer = Trainer(model, config(save_every=1), batch_fn, out_dir=tmp_path / "run")
    with pytest.raises(FloatingPointError, match="diverged at step 3.*lower train.lr"):
        trainer.fit(progress=False)
    assert trainer.step == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["step"] == 2
