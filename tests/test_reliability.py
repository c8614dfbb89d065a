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
    seq = torch.randint(3, 40, (4, 24), generator=generator)
    return {"input_ids": seq, "labels": seq}


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


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup code catches it."""


def kill_at_rename(monkeypatch, which: int):
    """Make the ``which``-th os.replace (0-based) of memzoo.io 'kill the process' before it runs."""
    import memzoo.io

    calls, real = [], memzoo.io.os.replace

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) - 1 == which:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(memzoo.io.os, "replace", replace)
    monkeypatch.setattr(memzoo.io.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path, monkeypatch):
    first = memzoo.build("window", **TINY, budget=8, evict_every=4)
    first.save_pretrained(tmp_path / "ck")
    second = memzoo.build("window", **TINY, budget=8, evict_every=4)
    with monkeypatch.context() as m:
        kill_at_rename(m, which=1)  # the first rename (ck -> .ck.old) ran, the second (tmp -> ck) did not
        with pytest.raises(Killed):
            second.save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck").exists() and (tmp_path / ".ck.old").is_dir()
    assert list(tmp_path.glob(".ck.tmp.*")), "the killed write left its temporary folder"
    loaded = memzoo.load(tmp_path / "ck")  # restored from .ck.old, orphans removed
    assert not list(tmp_path.glob(".ck*"))
    # exact: the previous save's tensors, read back from the same file
    for (name, a), (_, b) in zip(loaded.named_parameters(), first.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_training_killed_in_a_checkpoint_swap_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(steps=4, lr=1e-2, warmup_steps=2, segment_len=8, save_every=2, log_every=1)
    run = tmp_path / "run"
    straight = memzoo.build("window", **TINY, budget=8, evict_every=4)
    Trainer(straight, config, batches, out_dir=tmp_path / "straight").fit(progress=False)

    torch.manual_seed(0)
    model = memzoo.build("window", **TINY, budget=8, evict_every=4)
    trainer = Trainer(model, config, batches, out_dir=run)
    real_save = trainer.save_checkpoint

    def save_then_die(path=None):
        if trainer.step == 4:  # the final save is killed between its renames (model/ inside it renames first)
            with monkeypatch.context() as m:
                kill_at_rename(m, which=2)
                real_save(path)
        return real_save(path)

    trainer.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        trainer.fit(progress=False)
    assert not (run / "last").exists() and (run / ".last.old").is_dir()

    torch.manual_seed(0)
    resumed = Trainer(memzoo.build("window", **TINY, budget=8, evict_every=4), config, batches, out_dir=run)
    resumed.fit(progress=False)
    assert resumed.step == 4 and not list(run.glob(".last*"))
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps  # the steps logged before the kill are not repeated
    # exact: steps 3-4 rerun from the step-2 checkpoint on the same data (resume is bit-exact)
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), straight.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_no_resume_starts_a_new_log(tmp_path):
    config = TrainConfig(steps=2, lr=1e-2, warmup_steps=1, segment_len=8, save_every=1, log_every=1)
    for _ in range(2):
        model = memzoo.build("window", **TINY, budget=8, evict_every=4)
        Trainer(model, config, batches, out_dir=tmp_path).fit(resume=False, progress=False)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps
