"""CMA-ES for the NAMM scorer: improvement, exact resume, ranks = one process, no pickle, the shipped config."""

from __future__ import annotations

import json
import math
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memzoo
from memzoo.memories.namm import load_namm_parameters, namm_parameter_count
from memzoo.tasks.retrieval import make_task, score_answers
from memzoo.training.evolution import Evolution, EvolutionConfig, compare_policies, evolve_namm, load_evolve_config, n_tokens_at

REPO = Path(__file__).resolve().parents[1]
DIM = 320  # >= cma's TPA_dimension (300): the step-size adaptation of the real 4172-dim run, with its injected samples
TARGET = np.linspace(-1.0, 1.0, DIM)


def sphere(x, tasks):
    """A toy fitness to maximise (best 0 at TARGET); the second task shifts it, as a curriculum would."""
    return -float(np.sum((x - TARGET) ** 2)) - 0.1 * (len(tasks) - 1), {"tasks": len(tasks)}


def toy_config(**kw) -> EvolutionConfig:
    curriculum = [{"task": "a", "from_generation": 0}, {"task": "b", "from_generation": 3}]
    return EvolutionConfig(**({"popsize": 8, "sigma0": 0.3, "generations": 6, "curriculum": curriculum} | kw))


def test_generations_keep_or_improve_the_best(tmp_path):
    evo = Evolution(sphere, np.zeros(DIM), toy_config(generations=12), tmp_path)
    first = sphere(np.zeros(DIM), ["a"])[0]
    records = []
    for _ in range(12):
        records.append(evo.step())
    for r0, r1 in zip(records, records[1:]):
        if r0["tasks"] == r1["tasks"]:  # a new task changes the fitness; within a task set the best never drops
            assert r1["best_fitness"] >= r0["best_fitness"]
    assert records[-1]["best_fitness"] > first
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in lines] == list(range(1, 13)) and lines[-1]["tasks"] == ["a", "b"]


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopped after 4 generations and rebuilt from its files, the run asks and tells exactly as one that never stopped."""
    straight = Evolution(sphere, np.zeros(DIM), toy_config(), tmp_path / "a")
    straight.run(progress=False)
    Evolution(sphere, np.zeros(DIM), toy_config(generations=4), tmp_path / "b").run(progress=False)
    resumed = Evolution(sphere, np.zeros(DIM), toy_config(), tmp_path / "b")
    assert resumed.generation == 4
    resumed.run(progress=False)
    np.testing.assert_array_equal(resumed.mean, straight.mean)  # bit for bit (diagonal CMA-ES)
    assert resumed.es.sigma == straight.es.sigma and resumed.best_fitness == straight.best_fitness
    np.testing.assert_array_equal(resumed.best_x, straight.best_x)
    a, b = ((tmp_path / d / "log.jsonl").read_text().splitlines() for d in "ab")
    assert [json.loads(x)["best_fitness"] for x in a] == [json.loads(x)["best_fitness"] for x in b]


def test_a_save_killed_midway_resumes_from_the_last_whole_state(tmp_path, monkeypatch):
    """A kill while generation 5's state is written (here: when its best vector is) leaves generation 4's
    state whole, best vector included; the resumed run drops the log line of the lost generation and
    equals a run that never stopped."""
    straight = Evolution(sphere, np.zeros(DIM), toy_config(), tmp_path / "a")
    straight.run(progress=False)
    Evolution(sphere, np.zeros(DIM), toy_config(generations=4), tmp_path / "b").run(progress=False)
    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):
        if self.name == "best_x.json":
            raise KeyboardInterrupt("killed")
        return write_text(self, text, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            Evolution(sphere, np.zeros(DIM), toy_config(), tmp_path / "b").run(progress=False)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 5  # generation 5 was logged, not saved
    resumed = Evolution(sphere, np.zeros(DIM), toy_config(), tmp_path / "b")
    assert resumed.generation == 4
    resumed.run(progress=False)
    np.testing.assert_array_equal(resumed.best_x, straight.best_x)
    np.testing.assert_array_equal(resumed.mean, straight.mean)
    assert [json.loads(x)["generation"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_resume_refuses_a_changed_population_or_run(tmp_path):
    run = {"backbone": "checkpoints/x", "memory": {"budget": 256}}
    Evolution(sphere, np.zeros(DIM), toy_config(generations=2), tmp_path, run=run).run(progress=False)
    with pytest.raises(ValueError, match=r"evolution.popsize: 8 -> 14"):
        Evolution(sphere, np.zeros(DIM), toy_config(generations=3, popsize=14), tmp_path, run=run)
    with pytest.raises(ValueError, match=r"run.memory.budget: 256 -> 512.*--allow-changed"):
        Evolution(sphere, np.zeros(DIM), toy_config(generations=3), tmp_path, run=run | {"memory": {"budget": 512}})
    # more generations and another time limit are how a run is continued: allowed
    assert Evolution(sphere, np.zeros(DIM), toy_config(generations=9, max_minutes=3), tmp_path, run=run).generation == 2
    with pytest.warns(UserWarning, match="sigma0: 0.3 -> 0.5"):
        evo = Evolution(sphere, np.zeros(DIM), toy_config(generations=3, sigma0=0.5), tmp_path, run=run, allow_changed=True)
    evo.run(progress=False)
    extra = json.loads((tmp_path / "state" / "state.json").read_text())["extra"]
    assert extra["changes"] == [{"generation": 2, "changes": ["evolution.sigma0: 0.3 -> 0.5"]}]


def test_state_files_hold_no_pickle(tmp_path, monkeypatch):
    Evolution(sphere, np.zeros(DIM), toy_config(generations=2), tmp_path).run(progress=False)
    state = tmp_path / "state"
    assert sorted(p.name for p in state.iterdir()) == ["best_x.json", "cma.safetensors", "state.json"]
    for name in ("state.json", "best_x.json"):
        json.loads((state / name).read_text())
    from safetensors.numpy import load_file

    assert "es.mean" in load_file(str(state / "cma.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("resuming must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert Evolution(sphere, np.zeros(DIM), toy_config(generations=3), tmp_path).generation == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        evo = Evolution(sphere, np.zeros(DIM), toy_config(generations=4), Path(out) / "run")
        evo.run(progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"mean": evo.mean.tolist(), "best": evo.best_fitness}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    """Each rank evaluates every other candidate; the gathered fitnesses give the one-process run exactly."""
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = Evolution(sphere, np.zeros(DIM), toy_config(generations=4), tmp_path / "single")
    single.run(progress=False)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    np.testing.assert_array_equal(np.array(ranks[0]["mean"]), single.mean)
    assert ranks[0]["best"] == single.best_fitness
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["world"] == 2


def test_retrieval_tasks_score_the_answer():
    tok = memzoo.tokenizer()
    for name in ("passkey", "book"):
        task = make_task(name, 3, 400, seed=5)
        assert task.prompts.shape == (3, 400) and task.answer_mask.any(1).all()
        text = tok.decode(task.prompts[0].tolist())
        assert (text.endswith("The pass key is ") and task.texts[0] in text) if name == "passkey" else text.endswith("Answer: the")
    torch.manual_seed(0)
    model = memzoo.build("full", d_model=32, n_layers=1, n_heads=2)
    r = score_answers(model, make_task("passkey", 2, 300, seed=0), segment_len=64)
    assert 0 < r["score"] <= r["prob"] <= 1 and r["accuracy"] in (0.0, 0.5, 1.0)  # geometric mean <= arithmetic mean


def test_a_task_the_backbone_cannot_do_is_refused():
    """Its full-cache score is ~0, so the ratio would be noise that evolution chases."""
    from memzoo.training.evolution import namm_fitness

    torch.manual_seed(0)
    full = memzoo.build("full", d_model=32, n_layers=1, n_heads=2)
    namm = memzoo.swap_memory(full, "namm", budget=64, evict_every=32)
    task = make_task("passkey", 2, 300, seed=0)
    evaluate = namm_fitness(namm, full, {"passkey": task}, segment_len=64, min_full_score=1.0)  # nothing reaches 1.0
    with pytest.raises(ValueError, match="cannot do the task"):
        evaluate(np.zeros(namm_parameter_count()), ["passkey"])


def test_shipped_evolve_configs_load():
    configs = sorted((REPO / "recipes" / "configs" / "evolve").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_evolve_config(path)
        evo = EvolutionConfig(**config["evolution"])
        if path.stem == "namm":  # the paper's search
            assert evo.popsize == 32 and evo.sigma0 == 0.065
        cache = config["memory"]["budget"] + config["memory"]["evict_every"]
        assert n_tokens_at(config["tasks"], 0) > cache  # every prompt evicts
        if config.get("init"):
            assert load_namm_parameters(REPO / config["init"]).numel() > 0


def held_out_sphere(x):
    """Another target: the held-out score disagrees with the training one, as held-out prompts do."""
    return -float(np.sum((x - 0.5 * TARGET) ** 2)), {}


def test_held_out_scores_the_mean_and_resume_keeps_its_best(tmp_path):
    """The mean is scored on held-out prompts every 2 generations and at the last; the best of those
    means is what export 'best_held_out' ships, and a resumed run keeps it exactly."""
    cfg = dict(generations=5, held_out_every=2, export="best_held_out")
    straight = Evolution(sphere, np.zeros(DIM), toy_config(**cfg), tmp_path / "a", held_out=held_out_sphere)
    records = [straight.step() for _ in range(5)]
    assert [r["generation"] for r in records if r["held_out"] is not None] == [2, 4, 5]
    assert straight.best_held_out == max(r["held_out"] for r in records if r["held_out"] is not None)
    assert held_out_sphere(straight.best_held_out_x)[0] == straight.best_held_out  # it is that generation's mean
    saved = {name: load_namm_parameters(tmp_path / "a" / f"{name}.safetensors").double().numpy() for name in ("mean", "best_held_out")}
    np.testing.assert_array_equal(saved["mean"], straight.mean.astype(np.float32))  # stored as fp32: bit for bit
    np.testing.assert_array_equal(saved["best_held_out"], straight.best_held_out_x.astype(np.float32))

    Evolution(sphere, np.zeros(DIM), toy_config(**cfg | {"generations": 3}), tmp_path / "b", held_out=held_out_sphere).run(progress=False)
    resumed = Evolution(sphere, np.zeros(DIM), toy_config(**cfg), tmp_path / "b", held_out=held_out_sphere)
    resumed.run(progress=False)
    assert (resumed.best_held_out, resumed.best_held_out_generation) == (straight.best_held_out, straight.best_held_out_generation)
    np.testing.assert_array_equal(resumed.best_held_out_x, straight.best_held_out_x)


def test_held_out_options_are_checked():
    with pytest.raises(ValueError, match="needs held_out_every"):
        EvolutionConfig(export="best_held_out")
    with pytest.raises(ValueError, match="export must be one of"):
        EvolutionConfig(export="last")
    with pytest.raises(ValueError, match="no held_out scorer"):
        Evolution(sphere, np.zeros(DIM), toy_config(held_out_every=1))


def test_a_fitness_that_resamples_is_told_each_generation():
    seen = []

    def evaluate(x, tasks):
        return sphere(x, tasks)

    evaluate.set_generation = seen.append
    evo = Evolution(evaluate, np.zeros(DIM), toy_config(generations=3))
    evo.run(progress=False)
    assert seen == [0, 1, 2]


def test_prompts_resample_per_generation_and_lengths_follow_the_curriculum():
    from memzoo.training.evolution import _task_sets

    lengths = [{"n_tokens": 300, "from_generation": 0}, {"n_tokens": 400, "from_generation": 2}]
    assert [n_tokens_at({"n_tokens": lengths}, g) for g in (0, 1, 2, 9)] == [300, 300, 400, 400]
    assert n_tokens_at({"n_tokens": lengths}, math.inf) == 400 and n_tokens_at({"n_tokens": 300}, 5) == 300
    fixed = {"tasks": {"n_prompts": 2, "n_tokens": lengths, "seed": 0}}
    resampled = {"tasks": fixed["tasks"] | {"resample": True}}
    a, b = (_task_sets(fixed, ["passkey"], g)["passkey"] for g in (0, 1))
    assert a is b  # one fixed set, built once
    c, d = (_task_sets(resampled, ["passkey"], g)["passkey"] for g in (0, 1))
    assert c.prompts.shape == d.prompts.shape == (2, 300) and not torch.equal(c.prompts, d.prompts)
    assert not torch.equal(c.prompts, a.prompts)  # resampled prompts are not the fixed set's
    assert _task_sets(resampled, ["passkey"], 2)["passkey"].prompts.shape == (2, 400)


def test_score_fitness_needs_no_full_cache():
    from memzoo.training.evolution import namm_fitness

    torch.manual_seed(0)
    namm = memzoo.build("namm", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32)
    task = make_task("passkey", 2, 300, seed=0)
    fitness, details = namm_fitness(namm, None, {"passkey": task}, segment_len=64, relative=False)(
        np.zeros(namm_parameter_count()), ["passkey"])  # fmt: skip
    assert fitness == details["passkey"]["score"] == score_answers(namm, task, 64)["score"]  # the same computation
    assert "ratio" not in details["passkey"]


BAD_TASKS = [
    ({"fitness": "auc"}, "tasks.fitness"),
    ({"n_tokens": [{"n_tokens": 300, "from_generation": 1}]}, "starting at"),
    ({"n_tokens": 0}, "positive length"),
    ({"prompts": 3}, "unknown tasks option"),
]


@pytest.mark.parametrize("bad, match", BAD_TASKS)
def test_bad_task_options_are_refused(tmp_path, bad, match):
    import yaml

    config = load_evolve_config(REPO / "recipes" / "configs" / "evolve" / "namm.yaml")
    config["tasks"] |= bad
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=match):
        load_evolve_config(path)


def test_evolve_with_resampling_held_out_and_a_start_vector(tmp_path):
    """The long-prompt recipe's options end to end on a tiny backbone: key redundancy, a start vector,
    prompts drawn anew each generation, answer-score fitness, the held-out mean exported."""
    from memzoo.memories.namm import redundancy_rule, save_namm_parameters

    torch.manual_seed(0)
    memzoo.build("full", d_model=32, n_layers=1, n_heads=2).save_pretrained(tmp_path / "backbone")
    save_namm_parameters(tmp_path / "rule.safetensors", redundancy_rule(0.9))
    config = {
        "name": "tiny-long",
        "backbone": [str(tmp_path / "backbone")],
        "memory": {"budget": 64, "evict_every": 32, "key_redundancy": True, "n_recent": 16},
        "init": str(tmp_path / "rule.safetensors"),
        "tasks": {"n_prompts": 2, "n_tokens": 300, "seed": 0, "segment_len": 64, "fitness": "score", "resample": True},
        "evolution": {"popsize": 4, "sigma0": 0.01, "generations": 2, "held_out_every": 1, "export": "best_held_out"},
        "out": str(tmp_path / "run"),
        "scorer_out": str(tmp_path / "scorer"),
        "checkpoint_out": str(tmp_path / "ckpt"),
    }
    summary = evolve_namm(config, progress=False)
    assert summary["full_scores"] == {}  # the score fitness never ran the full cache
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["held_out"] is not None for r in records] == [True, True]
    assert summary["best_held_out"] == max(r["held_out"] for r in records)
    shipped = load_namm_parameters(tmp_path / "scorer")
    torch.testing.assert_close(shipped, load_namm_parameters(tmp_path / "run" / "best_held_out.safetensors"), atol=0, rtol=0)  # a copy
    torch.testing.assert_close(load_namm_parameters(tmp_path / "ckpt"), shipped, atol=0, rtol=0)
    assert shipped.numel() == namm_parameter_count(26)
    card = (tmp_path / "scorer" / "README.md").read_text()
    assert "best on the held-out prompts" in card and "mean, held out" in card


def test_evolve_namm_end_to_end_tiny(tmp_path):
    """A tiny backbone: evolve two generations, ship the scorer and a namm checkpoint with its card."""
    from memzoo.cards import write_card

    torch.manual_seed(0)
    memzoo.build("full", d_model=32, n_layers=1, n_heads=2).save_pretrained(tmp_path / "backbone")
    config = {
        "name": "tiny",
        "backbone": [str(tmp_path / "missing"), str(tmp_path / "backbone")],
        "memory": {"budget": 64, "evict_every": 32},
        "tasks": {"n_prompts": 2, "n_tokens": 300, "seed": 0, "segment_len": 64, "min_full_score": 0.0},  # untrained: ~0
        "evolution": {"popsize": 4, "sigma0": 0.065, "generations": 2,
                      "curriculum": [{"task": "passkey", "from_generation": 0}, {"task": "book", "from_generation": 1}]},
        "out": str(tmp_path / "run"),
        "scorer_out": str(tmp_path / "scorer"),
        "checkpoint_out": str(tmp_path / "ckpt"),
    }  # fmt: skip
    # An exploratory run (export=False) leaves scorer_out and checkpoint_out alone ...
    evolve_namm(config | {"out": str(tmp_path / "explore")}, progress=False, export=False, generations=1)
    assert (tmp_path / "explore" / "run.json").is_file()
    assert not (tmp_path / "scorer").exists() and not (tmp_path / "ckpt").exists()
    # ... and the default ships the best scorer and a checkpoint with it.
    summary = evolve_namm(config, progress=False, command="memzoo namm evolve --config tiny.yaml")
    assert summary["generations"] == 2 and set(summary["full_scores"]) == {"passkey", "book"}
    best = load_namm_parameters(tmp_path / "scorer" / "namm.safetensors")
    assert best.shape == (namm_parameter_count(),) and best.abs().sum() > 0
    model = memzoo.load(tmp_path / "ckpt")
    assert model.config.memory == "namm"
    torch.testing.assert_close(load_namm_parameters(tmp_path / "ckpt"), best)
    training = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    assert training["derived_from"] == str(tmp_path / "backbone") and training["evolved"]["generations"] == 2
    card = write_card(tmp_path / "ckpt").read_text()
    assert "evolved by CMA-ES" in card and "2 generations" in card
    scorer_card = (tmp_path / "scorer" / "README.md").read_text()
    assert "| 2 | passkey+book |" in scorer_card and (tmp_path / "scorer" / "fitness.png").stat().st_size > 0
    assert (tmp_path / "scorer" / "log.jsonl").read_text() == (tmp_path / "run" / "log.jsonl").read_text()
    results = compare_policies(config, tmp_path / "ckpt", ("namm", "window"), n_prompts=2)  # the namm checkpoint's own backbone
    assert set(results["designs"]) == {"full", "namm", "window"} and results["designs"]["full"]["book"]["ratio_to_full"] == 1.0
    assert results["designs"]["namm"]["passkey"]["score"] > 0
