"""The trainer: exact resume, truncated BPTT, data parallel equal to one process."""

from __future__ import annotations

import json
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import assert_close, rounding, tol

import memzoo
from memzoo.training import TrainConfig, Trainer

TINY = dict(d_model=32, n_layers=2, n_heads=2)


def random_batches(batch_size: int = 4, n: int = 24):
    def batch_fn(step: int, generator: torch.Generator) -> dict:
        seq = torch.randint(3, 40, (batch_size, n), generator=generator)
        weights = torch.rand(batch_size, n, generator=generator)
        return {"input_ids": seq, "labels": seq, "loss_weights": weights}  # transformers' convention

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
    # bit for bit: the resumed run replays the same batches on the same weights and moments (saved
    # and loaded exactly), so the same ops see the same inputs in the same order
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    losses = lambda run: [json.loads(ln)["loss"] for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("a") == losses("b")
    assert (tmp_path / "b" / "last" / "optimizer.safetensors").is_file()


def test_a_run_keeps_the_cpus_that_ran_its_steps_across_resumes(tmp_path, monkeypatch):
    """A resume on another CPU opens a new entry; one on the same CPU extends the last; the card lists them."""
    import memzoo.bench
    from memzoo.cards import _machine_lines

    flags = [["avx2"]]
    monkeypatch.setattr(memzoo.bench, "cpu_flags", lambda: list(flags[0]))
    for steps, cpu in ((2, ["avx2"]), (3, ["avx2"]), (4, ["avx2", "avx512_bf16", "avx512f"])):
        flags[0] = cpu
        trainer = Trainer(make("full"), config(steps=steps), random_batches(), out_dir=tmp_path / "run")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the schedule stretches: steps 2 -> 3 -> 4
            trainer.fit(progress=False)
    expected = [{"from_step": 0, "to_step": 3, "cpu_flags": ["avx2"]},
                {"from_step": 3, "to_step": 4, "cpu_flags": ["avx2", "avx512_bf16", "avx512f"]}]  # fmt: skip
    assert trainer.machines == expected
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["machines"] == expected
    assert _machine_lines({"machines": expected}) == [
        "- CPU flags, steps 0-3: avx2", "- CPU flags, steps 3-4: avx2, avx512_bf16, avx512f",
    ]  # fmt: skip
    late = [{"from_step": 2, "to_step": 4, "cpu_flags": ["avx2"]}]  # resumed from a checkpoint that kept none
    assert _machine_lines({"machines": late})[0].startswith("- CPU flags, steps 0-2: not recorded")
    assert _machine_lines({"machines": expected[:1]}) == ["- CPU flags: avx2"]


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
        # the weight gradients sum over the batch's 4 x 24 = 96 token positions (as long as the FFN's
        # d_ff = 96), back through both layers; gradients cancel, so the tensor's own max is the scale
        assert_close(a, b, n=4 * 24, depth=model.config.n_layers, scale="max")


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
    mask[:, 4] = mask[:, 20] = True  # predicted at 3 (first segment) and at 19 (third): labels shift
    batch["metric_masks"] = {"probe": mask}
    model = make("full")
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    at = memzoo.shift_labels(mask, False)  # the positions that predict the masked tokens
    assert at[:, 3].all() and at[:, 19].all() and int(at.sum()) == 2 * mask.shape[0]
    expected = torch.nn.functional.cross_entropy(logits[at], memzoo.shift_labels(batch["labels"])[at])
    metrics = Trainer(model, config(segment_len=8, lr=0.0), lambda s, g: batch).train_step()
    # streamed in 3 segments vs one call: the logits' longest reduction is the FFN's (d_ff = 96), 2 layers
    assert metrics["ce_probe"] == pytest.approx(float(expected), rel=rounding(n=model.config.d_ff, depth=model.config.n_layers))


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    # the last step is one cosine step (of 90) above the floor: python floats, double rounding only
    assert cfg.lr_at(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 90)), rel=rounding(torch.float64))
    assert cfg.lr_at(10) > cfg.lr_at(50) > cfg.lr_at(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_config() -> TrainConfig:
    # no clipping: it rescales by the global norm, which (like Adam, below) would hide a gradient
    # that is off by a constant factor, e.g. an all-reduce that averages instead of summing
    return config(steps=2, save_every=0, grad_clip=0.0)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make(budget=8, evict_every=4)
    trainer = Trainer(model, _ddp_config(), random_batches())
    losses = [trainer.train_step()["loss"]]
    # train_step leaves the all-reduced (summed) gradient on p.grad
    save_file({name: p.grad.contiguous() for name, p in model.named_parameters()}, f"{out}/grads{rank}.safetensors")
    losses.append(trainer.train_step()["loss"])
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, f"{out}/weights{rank}.safetensors")
    with open(f"{out}/losses{rank}.json", "w") as f:
        json.dump(losses, f)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    """Each rank takes half of the global batch; the summed gradient is the one-process gradient.

    The comparison with one process is on the step-1 gradients, not on the weights after AdamW:
    Adam divides by sqrt(v) + eps, so a gradient component near 0 turns its rounding into an
    update of up to lr, and since Adam is invariant to a gradient's scale, a weights comparison
    would not even catch an all-reduce that averages instead of summing. The gradients would.
    """
    from safetensors.torch import load_file

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = make(budget=8, evict_every=4)
    trainer = Trainer(single, _ddp_config(), random_batches())
    losses = [trainer.train_step()["loss"]]
    grads = {name: p.grad.clone() for name, p in single.named_parameters()}
    losses.append(trainer.train_step()["loss"])

    weights = [load_file(tmp_path / f"weights{r}.safetensors") for r in range(2)]
    rank_grads = load_file(tmp_path / "grads0.safetensors")
    assert weights[0].keys() == weights[1].keys() == rank_grads.keys() == grads.keys()
    for name in grads:
        # bit for bit: the all-reduce gives every rank the same sum, and the AdamW update of the
        # same weights with the same gradient and moments is deterministic
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        # the same sum in another order: each rank sums its 2 x 24 token positions, the all-reduce
        # adds the 2 partial sums (96 positions in all, 2 layers); gradients cancel: scale = max
        expected = grads[name]
        op = tol(n=4 * 24, depth=single.config.n_layers, scale=float(expected.abs().max()))
        torch.testing.assert_close(rank_grads[name], expected, **op, msg=lambda m, name=name: f"{name}: {m}")
    for r in range(2):
        logged = json.loads((tmp_path / f"losses{r}.json").read_text())
        # the all-reduced loss of step 1, and of step 2 after one more (optimiser) step in series
        for step, (got, want) in enumerate(zip(logged, losses), start=1):
            assert_close(torch.tensor(got), torch.tensor(want), dtype=torch.float32, n=4 * 24, depth=step * single.config.n_layers)


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
        torch.testing.assert_close(own[name], param, atol=0, rtol=0)  # copied: bit for bit

    wider = memzoo.build("full", d_model=64, n_layers=2, n_heads=2)
    with pytest.raises(ValueError, match="same d_model"):
        warm_start(wider, tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        warm_start(target, tmp_path / "nowhere")


@pytest.mark.parametrize("name, options", [("titans-mac", {}), ("titans-mac", {"output": "add"}), ("titans-mag", {}), ("titans-mal", {})])
def test_warm_start_maps_attention_onto_titans_softmax_branch(tmp_path, name, options):
    from memzoo.training import warm_start

    source = make("full")
    source.save_pretrained(tmp_path / "full")
    target = make(name, chunk_size=4, **({"segment_len": 8} if name == "titans-mac" else {"window": 8}), **options)
    report = warm_start(target, tmp_path / "full")
    own, src = dict(target.named_parameters()), dict(source.named_parameters())
    qkv = src["blocks.1.mixer.qkv.weight"]
    proj = "attn." if name == "titans-mac" else "attn.proj."
    # copied slices of the fused projection: bit for bit
    torch.testing.assert_close(own[f"blocks.1.mixer.{proj}q.weight"], qkv[:32], atol=0, rtol=0)
    torch.testing.assert_close(own[f"blocks.1.mixer.{proj}kv.weight"], qkv[32:], atol=0, rtol=0)
    assert "blocks.1.mixer.memory.qkv.weight" in report["kept_init"]  # the neural memory learns from scratch
    if name == "titans-mac":  # the output gate starts at exactly 1 and W_O = I: the attention output passes unchanged
        torch.testing.assert_close(own["blocks.1.mixer.out.weight"], torch.eye(32), atol=0, rtol=0)
        torch.testing.assert_close(own["blocks.1.mixer.attn_out.weight"], src["blocks.1.mixer.out.weight"], atol=0, rtol=0)
        if options.get("output") == "add":  # the read's projection starts at 0: the output is W_O y alone
            assert float(own["blocks.1.mixer.memory_out.weight"].abs().max()) == 0.0
        else:
            assert float(own["blocks.1.mixer.read_norm.weight"].abs().max()) == 0.0


def test_resuming_with_other_settings_is_refused(tmp_path):
    Trainer(make("full"), config(steps=2), random_batches(), out_dir=tmp_path).fit(progress=False)
    with pytest.raises(ValueError, match=r"other settings \(config.lr: 0.01 -> 0.02\).*--allow-changed"), pytest.warns(UserWarning):
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
            batch["loss_weights"][0, 1] = float("nan")  # (position 0's weight is never read: nothing predicts token 0)
        return batch

    model = make(budget=8, evict_every=4)
    trainer = Trainer(model, config(save_every=1), batch_fn, out_dir=tmp_path / "run")
    with pytest.raises(FloatingPointError, match="diverged at step 3.*lower train.lr"):
        trainer.fit(progress=False)
    assert trainer.step == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["step"] == 2


def test_resume_compares_the_model_and_task_sections_too(tmp_path):
    """A recipe's model and task decide what is trained as much as its train section does."""
    run = {"model": {"memory": "full", "n_layers": 2}, "task": {"name": "passkey", "segment_len": 64}}
    Trainer(make("full"), config(steps=2), random_batches(), out_dir=tmp_path, run=run).fit(progress=False)
    changed = {"model": run["model"], "task": {"name": "passkey", "segment_len": 32, "needle_near_end_prob": 0.5}}
    with pytest.raises(ValueError, match=r"run.task.needle_near_end_prob: '<unset>' -> 0.5; run.task.segment_len: 64 -> 32"):
        Trainer(make("full"), config(steps=2), random_batches(), out_dir=tmp_path, run=changed).fit(progress=False)
    with pytest.warns(UserWarning, match="as --allow-changed asks"):
        trainer = Trainer(make("full"), config(steps=3), random_batches(), out_dir=tmp_path, run=changed, allow_changed=True)
        with pytest.warns(UserWarning, match="steps 2 -> 3"):
            trainer.fit(progress=False)
    saved = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert saved["run"] == changed and saved["changes"][0]["step"] == 2
    assert any("segment_len: 64 -> 32" in c for c in saved["changes"][0]["changes"])


def test_train_recipe_refuses_a_changed_memory_and_starting_over_clears_the_log(tmp_path):
    from memzoo.training.recipe import train_recipe

    recipe = {"name": "t", "model": {"memory": "infini", **TINY, "segment_len": 160},
              "task": {"name": "passkey", "n_tokens": 320, "batch_size": 1},
              "train": dict(steps=2, lr=1e-3, warmup_steps=1, segment_len=160, log_every=1, save_every=1)}  # fmt: skip
    train_recipe(recipe, tmp_path, progress=False)
    other = recipe | {"model": recipe["model"] | {"memory": "infini-linear"}}
    with pytest.raises(ValueError, match=r"run.model.memory: 'infini' -> 'infini-linear'"):
        train_recipe(other, tmp_path, progress=False)
    train_recipe(other, tmp_path, resume=False, progress=False)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the earlier run's lines are gone, not appended to


class _SkewedClock:
    """``time`` for one rank: rank 0's clock runs 20 s per call, the other rank's barely moves."""

    def __init__(self, rank: int):
        self.now, self.tick = 0.0, 20.0 if rank == 0 else 1e-3

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def _time_limit_rank(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import memzoo.training.trainer as trainer_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: without the broadcast, the rank still training would wait on an all_reduce
    # that the stopped rank never joins, and fail here instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    trainer_module.time = _SkewedClock(rank)
    trainer = Trainer(make(budget=8, evict_every=4), config(steps=50, max_minutes=1.0, save_every=0, grad_clip=0.0),
                      random_batches(), out_dir=f"{out}/run")  # fmt: skip
    trainer.fit(progress=False)
    with open(f"{out}/step{rank}.json", "w") as f:
        json.dump(trainer.step, f)
    dist.destroy_process_group()


def test_two_ranks_stop_at_the_same_step_on_rank_zeros_clock(tmp_path):
    mp.spawn(_time_limit_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    steps = [json.loads((tmp_path / f"step{r}.json").read_text()) for r in range(2)]
    assert steps[0] == steps[1] < 50  # rank 0's clock said stop; rank 1's alone never would have
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["step"] == steps[0]


@pytest.mark.filterwarnings("ignore:resuming")  # the resumes below are meant: a longer run, then a changed one
def test_autocast_auto_follows_the_cpu_and_a_resume_that_resolves_it_otherwise_is_refused(tmp_path, monkeypatch):
    """"auto" is bf16 where bf16 is native and none elsewhere, decided once and kept with the run."""
    import memzoo.bench
    from memzoo.training.trainer import TrainConfig, Trainer

    def batch_fn(step, generator):
        ids = torch.randint(3, 200, (2, 16), generator=generator)
        return {"input_ids": ids, "labels": ids}

    def trainer(native: bool, steps: int, **kw) -> Trainer:
        monkeypatch.setattr(memzoo.bench, "native_bf16", lambda device="cpu": native)
        torch.manual_seed(0)
        model = memzoo.build("full", d_model=32, n_layers=1, n_heads=2)
        cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=1, segment_len=16, autocast="auto", log_every=1, save_every=1)
        return Trainer(model, cfg, batch_fn, out_dir=tmp_path / "run", **kw)

    native = trainer(True, 1)
    assert native.autocast == "bf16" and native._autocast().fast_dtype == torch.bfloat16
    native.fit(progress=False)
    with pytest.raises(ValueError, match="autocast_resolved"):
        trainer(False, 2).fit(progress=False)  # the same run resumed where bf16 is not native
    emulated = trainer(False, 2, allow_changed=True)
    assert emulated.autocast == "none"
    emulated.fit(progress=False)
    assert emulated.step == 2
