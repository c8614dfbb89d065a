"""CMA-ES over the NAMM scorer vector: population evaluation across ranks, curriculum, safe resume.

NAMM's scorer decides discrete evictions, so it has no useful gradient; the paper evolves it with
CMA-ES (population 32, sigma0 0.065, arXiv 2410.13166). One generation:

1. every rank asks the *same* ``cma.CMAEvolutionStrategy`` (same options, same seed, same history)
   for the population, so every rank holds the same candidates without communicating;
2. rank r evaluates candidates i = r, r + world, ... (and the mean, index ``popsize``, on
   rank ``popsize % world``); fitnesses are summed across ranks with ``all_reduce`` (the others'
   entries are 0), which is an all_gather of the population's fitness;
3. every rank tells its ES the same fitnesses (negated: cma minimises), so states stay identical.

Fitness of a NAMM vector (:func:`namm_fitness`): per active task, the task score
(:func:`memzoo.tasks.retrieval.score_answers`, ``exp(-mean CE)`` of the answer) with the NAMM divided
by the score of the same backbone with a full cache on the same prompts (computed once per task and
kept), averaged over tasks. 1.0 = as good as keeping everything. The task curriculum adds tasks at
given generations; the best-so-far is re-measured when the task set changes, so it always refers to
the current fitness.

Covariance: by default separable (diagonal) CMA-ES (``CMA_diagonal=True``). A full covariance over the
4,172 scorer parameters is a 4,172 x 4,172 matrix (139 MB in float64, an O(n^3) eigendecomposition
every few generations): more than the whole evaluation budget of a CPU run. ``diagonal=False`` gives
the full form for whoever has the machine for it.

Resume without pickle: ``state/cma.safetensors`` holds every numeric array of the ES and of its
step-size adaptation, diagonal scaling, sampler and best solution (mean, sigma vector, paths pc / ps,
diagonal covariance dC and D, the old means...), the pending injected directions (the mean shift that
TPA step-size adaptation, cma's default in this dimension, evaluates first) and the sampler's random
generator (the MT19937 key),
and ``state/state.json`` every scalar (sigma, counters, generation, best fitness, the full-cache
scores). A fresh ES is built from the same options and these values are set on it. Options and
derived constants (weights, learning rates) are recomputed from the config, not stored; stopping-
criterion bookkeeping, timers and the solution archives are not restored (they do not influence
``ask``/``tell`` here). The test checks that a resumed run asks the same next population and reaches
the same mean as an uninterrupted one, bit for bit, for the diagonal form; the full-covariance form
also stores ``C``/``B``/``D`` but its eigendecomposition schedule is not checked (documented as approximate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..io import atomic_directory, recover_directory
from ..validation import bounds, check_fields
from .resume import check_same_run, truncate_log

__all__ = ["EvolutionConfig", "Evolution", "namm_fitness", "load_cma_state", "save_cma_state"]

# Objects of a cma.CMAEvolutionStrategy whose numeric attributes make up its state (see the module docstring).
_PARTS = ("es", "adapt_sigma", "sigma_vec", "sm", "best")
# Attributes not restored: inputs and logs that do not steer ask/tell, or that hold the last population only.
# The sampler's _mueff/_lam key a cache of learning rates that is not stored: restoring the key alone would
# make cma believe the (missing) cache is valid.
_SKIP = {"ary", "pop_sorted", "x0", "mean0", "sigma0", "sigma_vec0", "inputargs", "inopts", "N", "N_pheno", "dimension", "_mueff", "_lam"}


#: EvolutionConfig fields a resumed run may change: how long it runs, not what it computes
_RESUMABLE_CHANGES = frozenset({"evolution.generations", "evolution.max_minutes"})

#: the vectors a run can ship (:attr:`EvolutionConfig.export`), each saved in the run folder under this name
EXPORTS = {"best": "best.safetensors", "mean": "mean.safetensors", "best_held_out": "best_held_out.safetensors"}


@dataclass
class EvolutionConfig:
    """CMA-ES settings.

    Attributes:
        popsize: candidates per generation (the paper's 32).
        sigma0: initial step size (the paper's 0.065).
        generations: stop after this many generations in total (a resumed run counts the earlier ones).
        curriculum: ``[{"task": name, "from_generation": g}, ...]``: each task joins the fitness after g
            completed generations (the first task at 0; in ``log.jsonl``, whose ``generation`` counts completed
            ones, the first line with it is ``generation == g + 1``).
        seed: seeds cma's sampler; every rank uses the same.
        diagonal: separable CMA-ES (linear in the dimension); False = full covariance.
        max_minutes: stop (after a complete generation, state saved) once this wall time has passed.
        evaluate_mean: also evaluate the distribution mean each generation (logged as ``mean_fitness``).
        held_out_every: score the distribution mean on the fixed held-out prompts every this many
            generations and at the last one (logged as ``held_out``); 0 = never.
        export: which vector ships: ``"best"`` (the best candidate seen; with resampled prompts each
            generation's prompts differ, so it is the luckiest more than the best), ``"mean"`` (the last
            distribution mean, as the paper's code exports) or ``"best_held_out"`` (the mean that scored
            best on the held-out prompts; needs ``held_out_every``).
    """

    popsize: int = field(default=32, metadata=bounds(ge=2))
    sigma0: float = field(default=0.065, metadata=bounds(gt=0))
    generations: int = field(default=100, metadata=bounds(ge=1))
    curriculum: list[dict] = field(default_factory=lambda: [{"task": "passkey", "from_generation": 0}])
    seed: int = 0
    diagonal: bool = True
    max_minutes: float | None = field(default=None, metadata=bounds(ge=0))
    evaluate_mean: bool = True
    held_out_every: int = field(default=0, metadata=bounds(ge=0))
    export: str = field(default="best", metadata=bounds(choices=tuple(EXPORTS)))

    def __post_init__(self):
        check_fields(self)
        if self.export == "best_held_out" and self.held_out_every < 1:
            raise ValueError("export 'best_held_out' needs held_out_every >= 1 (how often the mean is scored on held-out prompts)")
        if not self.curriculum or min(int(c["from_generation"]) for c in self.curriculum) != 0:
            raise ValueError(f"the curriculum must start a task at generation 0, got {self.curriculum}")

    def tasks_at(self, generation: int) -> list[str]:
        """The tasks of the fitness at ``generation``, in curriculum order."""
        return [c["task"] for c in self.curriculum if int(c["from_generation"]) <= generation]


# ------------------------------------------------------------------------------------ cma state
def _cma_options(config: EvolutionConfig, rng: np.random.RandomState) -> dict:
    # A private generator, not numpy's global one: other code drawing from np.random must not shift the
    # candidates, and its MT19937 state is plain arrays that safetensors can hold.
    return {"popsize": config.popsize, "seed": config.seed, "CMA_diagonal": bool(config.diagonal), "verbose": -9, "randn": rng.randn,
            "verb_log": 0, "verb_disp": 0, "tolfun": 0, "tolx": 0, "tolflatfitness": math.inf, "tolstagnation": math.inf}  # fmt: skip


def _new_es(x0: np.ndarray, config: EvolutionConfig):
    import cma

    rng = np.random.RandomState(config.seed)
    es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), config.sigma0, _cma_options(config, rng))
    es._memzoo_rng = rng  # the generator behind opts['randn'], saved with the state
    return es


def _part(es, name: str):
    return es if name == "es" else getattr(es, name, None)


def save_cma_state(es, folder: str | Path, extra: dict | None = None, files: dict[str, str] | None = None) -> None:
    """Write an ES's state as ``cma.safetensors`` (arrays) + ``state.json`` (scalars), no pickle.

    Args:
        es: a ``cma.CMAEvolutionStrategy`` made by this module (it carries its random generator).
        folder: written atomically (a temporary folder, then renamed over).
        extra: JSON-serialisable values stored beside the ES's (e.g. the generation).
        files: ``{name: text}`` written into the same folder, so they are swapped in with the state
            (a kill can never leave a state without its best vector).
    """
    from safetensors.numpy import save_file

    arrays, scalars = {}, {}
    for name in _PARTS:
        obj = _part(es, name)
        for key, value in (vars(obj) if obj is not None else {}).items():
            if key in _SKIP or key.startswith("__"):
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.ndim > 0:
                arrays[f"{name}.{key}"] = np.ascontiguousarray(value)
            elif isinstance(value, (bool, int, float, np.floating, np.integer, np.bool_)) or value is None:
                v = value.item() if isinstance(value, np.generic) else value
                scalars[f"{name}.{key}"] = {"value": v if not (isinstance(v, float) and not math.isfinite(v)) else repr(v),
                                            "type": type(value).__name__}  # fmt: skip
    # Pending injections: with TPA step-size adaptation (cma's default from dimension 100 on) tell leaves the
    # mean shift +-(mean - mean_old) here for the next ask to put first in the population.
    for key in ("pop_injection_directions", "pop_injection_solutions"):
        arrays[f"list.{key}"] = np.asarray(getattr(es, key), dtype=np.float64).reshape(-1, es.N)
    kind, keys, pos, has_gauss, cached = es._memzoo_rng.get_state()
    arrays["rng.keys"] = np.asarray(keys, dtype=np.uint32)
    state = {"cma": scalars, "rng": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "extra": extra or {}}  # fmt: skip
    with atomic_directory(folder) as tmp:
        save_file(arrays, str(tmp / "cma.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)


def load_cma_state(folder: str | Path, x0: np.ndarray, config: EvolutionConfig):
    """Rebuild an ES from :func:`save_cma_state`'s files: a fresh ES with the same options, its state set.

    Returns:
        ``(es, extra)``.
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    arrays = load_file(str(folder / "cma.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    es = _new_es(x0, config)
    for key, array in arrays.items():
        name, attr = key.split(".", 1)
        if name == "list":
            setattr(es, attr, [row.copy() for row in array])
        elif name != "rng":
            setattr(_part(es, name), attr, array.copy())
    casts = {"float64": np.float64, "int64": np.int64, "bool_": np.bool_, "float": float, "int": int, "bool": bool,
             "NoneType": lambda v: None}  # fmt: skip
    for key, entry in state["cma"].items():
        name, attr = key.split(".", 1)
        value = entry["value"]
        value = float(value) if isinstance(value, str) else value  # 'inf', 'nan'
        setattr(_part(es, name), attr, casts.get(entry["type"], lambda v: v)(value))
    if es.countiter > 0 and "list.pop_injection_directions" not in arrays:  # a state saved before they were stored
        es._prepare_injection_directions()  # what tell computes from mean, mean_old and pc (no randomness)
    if es.countiter > 0:  # cma starts its wall-clock timer at the first ask only
        from cma.utilities.utils import ElapsedWCTime

        es.timer = ElapsedWCTime()
    rng = state["rng"]
    es._memzoo_rng.set_state((rng["kind"], arrays["rng.keys"], rng["pos"], rng["has_gauss"], rng["cached_gaussian"]))
    return es, state["extra"]


# ------------------------------------------------------------------------------------ distributed
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------ the loop
Evaluate = Callable[[np.ndarray, Sequence[str]], tuple[float, dict]]


class Evolution:
    """CMA-ES on a fitness to maximise, resumable, its work split over ``torch.distributed`` ranks.

    Args:
        evaluate: ``(vector [n] float64, tasks) -> (fitness, details)``; details is JSON-serialisable.
            Deterministic: every rank must get the same number for the same call. If it has a
            ``set_generation(g)`` method, that is called before each generation's evaluations (a
            fitness that draws new prompts every generation, see :func:`namm_fitness`).
        x0: [n] the start (the mean of the first generation).
        config: :class:`EvolutionConfig`.
        out_dir: ``log.jsonl`` (a line per generation), ``best.safetensors`` (the best vector, key ``namm``),
            ``mean.safetensors`` (the last distribution mean), ``best_held_out.safetensors`` (the mean
            that scored best on held-out prompts), ``state/`` (the resumable state). Rank 0 writes;
            None = nothing written.
        held_out: ``(vector) -> (score, details)`` on a fixed set of prompts never used for selection;
            the mean is scored with it every ``config.held_out_every`` generations.
        run: the other settings that decide what is evaluated (backbone, memory options, tasks,
            start vector), stored with the state: a resume with other ones, or with another
            ``config`` (except ``generations`` and ``max_minutes``), is refused.
        allow_changed: resume even if they changed (a warning names each change; the state keeps
            the list with the generation it was made at).

    Example:
        >>> evo = Evolution(namm_fitness(namm_model, full_model, tasks), x0, EvolutionConfig(), "runs/namm-evolve")
        >>> evo.run()  # resumes from runs/namm-evolve/state if present
    """

    def __init__(self, evaluate: Evaluate, x0, config: EvolutionConfig, out_dir: str | Path | None = None, *, resume: bool = True,
                 held_out: Callable[[np.ndarray], tuple[float, dict]] | None = None, run: dict | None = None,
                 allow_changed: bool = False):  # fmt: skip
        if config.held_out_every and held_out is None:
            raise ValueError("held_out_every is set but no held_out scorer was given")
        self.evaluate, self.config, self.held_out = evaluate, config, held_out
        self.x0 = np.asarray(x0, dtype=np.float64).ravel()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank, self.world = _rank_world()
        self.generation, self.wall_s = 0, 0.0
        self.best_fitness, self.best_details, self.best_tasks = -math.inf, {}, []
        self.best_x = self.x0.copy()
        self.best_held_out, self.best_held_out_generation, self.best_held_out_x = -math.inf, None, None
        self.run_settings, self.changes = dict(run or {}), []
        state = self.out_dir / "state" if self.out_dir is not None else None
        if resume and state is not None and self.rank == 0:
            recover_directory(state)  # a save killed between its two renames left its copy as .state.old
        if self.world > 1:
            dist.barrier()
        if resume and state is not None and (state / "state.json").is_file():
            self.es, extra = load_cma_state(state, self.x0, config)
            self.changes = list(extra.get("changes", []))
            saved = {"evolution": extra.get("config", {}), "run": extra.get("run", {})}
            current = {"evolution": asdict(config), "run": self.run_settings}
            if "run" not in extra:  # saved before states stored the run's settings
                saved.pop("run"), current.pop("run")
            changes = check_same_run(saved, current, state, may_change=_RESUMABLE_CHANGES, allow_changed=allow_changed)
            if changes:
                self.changes.append({"generation": extra["generation"], "changes": changes})
            self.generation, self.wall_s = extra["generation"], extra["wall_s"]
            self.best_fitness, self.best_details, self.best_tasks = extra["best_fitness"], extra["best_details"], extra["best_tasks"]
            self.best_x = np.asarray(json.loads((state / "best_x.json").read_text()), dtype=np.float64)  # JSON floats round-trip exactly
            if extra.get("best_held_out_generation") is not None:
                self.best_held_out, self.best_held_out_generation = extra["best_held_out"], extra["best_held_out_generation"]
                self.best_held_out_x = np.asarray(json.loads((state / "best_held_out_x.json").read_text()), dtype=np.float64)
        else:
            self.es = _new_es(self.x0, config)
        if self.out_dir is not None and self.rank == 0:  # generations logged after the saved state (a kill) go
            truncate_log(self.out_dir / "log.jsonl", "generation", self.generation)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean [n]."""
        return np.asarray(self.es.mean, dtype=np.float64).copy()

    def _evaluate_all(self, candidates: list[np.ndarray], tasks: list[str], scorer=None) -> tuple[np.ndarray, list[dict]]:
        """Fitness of every candidate (``scorer(x)``, default ``evaluate(x, tasks)``), each computed on one
        rank, then shared (identical on every rank)."""
        scorer = scorer or (lambda x: self.evaluate(x, tasks))
        fits = torch.zeros(len(candidates), dtype=torch.float64)
        details: list[dict] = [{} for _ in candidates]
        for i in range(self.rank, len(candidates), self.world):
            fits[i], details[i] = scorer(candidates[i])
        if self.world > 1:
            dist.all_reduce(fits)  # each entry is non-zero on one rank only: a gather
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, details)  # dicts of floats between this job's own ranks (nothing read from disk)
            details = [gathered[i % self.world][i] for i in range(len(candidates))]
        return fits.numpy(), details

    def step(self) -> dict:
        """One generation: ask, evaluate (split over ranks), tell. Returns its log record."""
        start = time.perf_counter()
        tasks = self.config.tasks_at(self.generation)
        if hasattr(self.evaluate, "set_generation"):
            self.evaluate.set_generation(self.generation)
        if tasks != self.best_tasks and self.best_tasks:  # the fitness changed: re-measure the best so far
            (self.best_fitness,), (self.best_details,) = self._evaluate_all([self.best_x], tasks)
            self.best_tasks = tasks
        population = [np.asarray(x, dtype=np.float64) for x in self.es.ask()]
        extra = [self.mean] if self.config.evaluate_mean else []
        fits, details = self._evaluate_all(population + extra, tasks)
        self.es.tell(population, [-float(f) for f in fits[: len(population)]])  # cma minimises
        i = int(np.argmax(fits[: len(population)]))
        if fits[i] > self.best_fitness or not self.best_tasks:
            self.best_fitness, self.best_x, self.best_details, self.best_tasks = float(fits[i]), population[i].copy(), details[i], tasks
        self.generation += 1
        held_out, held_out_details = None, None
        every = self.config.held_out_every
        if every and (self.generation % every == 0 or self.generation == self.config.generations):
            mean = self.mean
            (held_out,), (held_out_details,) = self._evaluate_all([mean], tasks, scorer=self.held_out)
            held_out = float(held_out)
            if held_out > self.best_held_out:
                self.best_held_out, self.best_held_out_generation, self.best_held_out_x = held_out, self.generation, mean
        seconds = time.perf_counter() - start
        self.wall_s += seconds
        pop = fits[: len(population)]
        record = {
            "generation": self.generation,
            "tasks": tasks,
            "best_fitness": self.best_fitness,
            "generation_best": float(pop.max()),
            "generation_median": float(np.median(pop)),
            "generation_worst": float(pop.min()),
            "mean_fitness": float(fits[-1]) if extra else None,
            "mean_details": details[-1] if extra else None,
            "held_out": held_out,
            "held_out_details": held_out_details,
            "best_details": self.best_details,
            "sigma": float(self.es.sigma),
            "evaluations": int(self.es.countevals),
            "seconds": round(seconds, 2),
            "wall_s": round(self.wall_s, 2),
            "world": self.world,
        }
        self._save(record)
        return record

    def _save(self, record: dict) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        from ..memories.namm import save_namm_parameters

        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        save_namm_parameters(self.out_dir / EXPORTS["best"], torch.from_numpy(self.best_x))
        save_namm_parameters(self.out_dir / EXPORTS["mean"], torch.from_numpy(self.mean))
        if self.best_held_out_x is not None:
            save_namm_parameters(self.out_dir / EXPORTS["best_held_out"], torch.from_numpy(self.best_held_out_x))
        extra = {"generation": self.generation, "wall_s": self.wall_s, "best_fitness": self.best_fitness,
                 "best_details": self.best_details, "best_tasks": self.best_tasks, "config": asdict(self.config),
                 "best_held_out": self.best_held_out, "best_held_out_generation": self.best_held_out_generation,
                 "run": self.run_settings, "changes": self.changes}  # fmt: skip
        files = {"best_x.json": json.dumps([float(v) for v in self.best_x])}  # JSON floats round-trip exactly
        if self.best_held_out_x is not None:
            files["best_held_out_x.json"] = json.dumps([float(v) for v in self.best_held_out_x])
        save_cma_state(self.es, self.out_dir / "state", extra, files)

    def run(self, progress: bool = True) -> dict:
        """Generations until ``config.generations`` (counting resumed ones) or ``config.max_minutes``.

        Returns:
            ``{"generations", "best_fitness", "wall_s", "stopped"}``.
        """
        cfg, start = self.config, time.perf_counter()
        bar = tqdm(total=cfg.generations, initial=self.generation, desc="cma-es", unit="gen", disable=not progress or self.rank != 0)
        stopped = "generations"
        while self.generation < cfg.generations:
            record = self.step()
            bar.update(1)
            bar.set_postfix(best=f"{record['best_fitness']:.4f}", mean=f"{record['mean_fitness'] or 0:.4f}", sigma=f"{record['sigma']:.4f}")
            elapsed = torch.tensor(time.perf_counter() - start)
            if self.world > 1:  # every rank stops at the same generation
                dist.broadcast(elapsed, 0)
            if cfg.max_minutes is not None and float(elapsed) >= 60 * cfg.max_minutes:
                stopped = "max_minutes"
                break
        bar.close()
        return {"generations": self.generation, "best_fitness": self.best_fitness, "wall_s": round(self.wall_s, 2), "stopped": stopped}


# ------------------------------------------------------------------------------------ NAMM fitness
#: below this full-cache score a task's ratio is noise (a measured case: a passkey backbone scored
#: 2e-6 on the book task, and evolution maximised ratios of 80 there while passkey fell to 0.002)
MIN_FULL_SCORE = 1e-3


def _check_informative(name: str, full_score: float, min_full_score: float) -> None:
    if full_score < min_full_score:
        raise ValueError(
            f"the backbone scores {full_score:.2g} on task {name!r} with a full cache (< {min_full_score:g}): it cannot do "
            "the task, so score(NAMM) / score(full) there is noise that evolution would chase; "
            "drop the task from evolution.curriculum or use a backbone trained on it"
        )


def namm_fitness(
    namm_model,
    full_model,
    tasks: dict | Callable[[int], dict],
    segment_len: int = 128,
    full_scores: dict | None = None,
    min_full_score: float = MIN_FULL_SCORE,
    relative: bool = True,
) -> Evaluate:
    """The NAMM fitness: mean over the active tasks of score(NAMM) / score(full cache), same prompts.

    Args:
        namm_model: a memzoo ``namm`` model (its scorer is overwritten by each candidate).
        full_model: the same backbone with ``full`` memory (unused, may be None, when ``relative`` is False).
        tasks: ``{name: RetrievalSet}`` (:mod:`memzoo.tasks.retrieval`), or ``generation -> {name: RetrievalSet}``
            to draw new prompts every generation (the returned ``evaluate`` then has ``set_generation``,
            which :class:`Evolution` calls; every candidate of a generation sees the same prompts).
        segment_len: tokens per forward call while streaming.
        full_scores: ``{name: score_answers result}`` of the full cache, if known (fixed ``tasks`` only);
            missing ones are computed on first use and kept (``evaluate.full_scores``).
        min_full_score: with ``relative``, a task whose full-cache score is below this raises
            ValueError (its ratio would be noise, see :data:`MIN_FULL_SCORE`).
        relative: divide by the full cache's score. False: the score itself (``exp(-mean CE)`` of the
            answer), for prompts longer than the backbone's trained positions, where a full cache reads
            nothing and the ratio would be noise.

    Returns:
        ``evaluate(vector, task_names) -> (fitness, {task: {"ratio" (if relative), "score", "accuracy", "prob"}})``.
    """
    from ..memories.namm import set_namm_parameters
    from ..tasks.retrieval import score_answers

    draw = tasks if callable(tasks) else None
    current = {"sets": tasks if draw is None else None}
    cache = dict(full_scores or {})

    def set_generation(generation: int) -> None:
        if draw is not None:
            sets = draw(generation)
            if sets is not current["sets"]:
                cache.clear()  # other prompts: the full cache's scores are measured again
            current["sets"] = sets

    def evaluate(vector: np.ndarray, names: Sequence[str]) -> tuple[float, dict]:
        if current["sets"] is None:
            set_generation(0)
        sets = current["sets"]
        set_namm_parameters(namm_model, torch.as_tensor(np.asarray(vector), dtype=torch.float32))
        details = {}
        for name in names:
            r = score_answers(namm_model, sets[name], segment_len)
            details[name] = {"score": r["score"], "accuracy": r["accuracy"], "prob": r["prob"]}
            if relative:
                if name not in cache:
                    cache[name] = score_answers(full_model, sets[name], segment_len)
                _check_informative(name, cache[name]["score"], min_full_score)
                details[name]["ratio"] = r["score"] / cache[name]["score"]
        key = "ratio" if relative else "score"
        return float(np.mean([d[key] for d in details.values()])), details

    evaluate.full_scores = cache
    if draw is not None:
        evaluate.set_generation = set_generation
    return evaluate


# ------------------------------------------------------------------------------------ the NAMM recipe
_EVOLVE_SECTIONS = {"name", "backbone", "memory", "tasks", "evolution", "init", "out", "scorer_out", "checkpoint_out", "notes"}
_TASK_OPTIONS = {"n_prompts", "n_tokens", "seed", "segment_len", "min_full_score", "fitness", "resample", "held_out_prompts"}

#: Seed offsets of the prompt sets: generation g of a resampling run draws seed + RESAMPLE_SEED + g, the held-out
#: prompts are seed + HELD_OUT_SEED, ``memzoo namm compare`` uses seed + 1000; a fixed set is seed itself.
RESAMPLE_SEED, HELD_OUT_SEED = 10_000, 1_000_000


def n_tokens_at(tasks: dict, generation: int | float) -> int:
    """Prompt length at ``generation``: ``tasks["n_tokens"]`` is a length, or a curriculum of lengths
    ``[{"n_tokens": 2048, "from_generation": 0}, {"n_tokens": 4096, "from_generation": 10}, ...]``
    (``math.inf`` gives the last stage's: the length the run aims at)."""
    spec = tasks["n_tokens"]
    if isinstance(spec, int):
        return spec
    return int([s for s in sorted(spec, key=lambda s: s["from_generation"]) if s["from_generation"] <= generation][-1]["n_tokens"])


def _check_tasks(path: Path, tasks: dict) -> None:
    unknown = set(tasks) - _TASK_OPTIONS
    if unknown:
        raise ValueError(f"{path}: unknown tasks option(s) {sorted(unknown)}; valid: {sorted(_TASK_OPTIONS)}")
    if tasks.get("fitness", "ratio") not in ("ratio", "score"):
        raise ValueError(f"{path}: tasks.fitness must be 'ratio' (score / full-cache score) or 'score', got {tasks['fitness']!r}")
    spec = tasks.get("n_tokens")
    stages = spec if isinstance(spec, list) else [{"n_tokens": spec, "from_generation": 0}]
    if not all(isinstance(s, dict) and isinstance(s.get("n_tokens"), int) and s["n_tokens"] > 0 for s in stages) or min(
        s.get("from_generation", -1) for s in stages
    ) != 0:
        raise ValueError(
            f"{path}: tasks.n_tokens must be a positive length or a list of {{n_tokens, from_generation}} starting at "
            f"generation 0, got {spec!r}"
        )


def load_evolve_config(path: str | Path) -> dict:
    """Read and check an evolution YAML (``recipes/configs/evolve/namm.yaml``).

    Sections: ``backbone`` (checkpoint folders, the first that exists is used), ``memory`` (``budget``,
    ``evict_every`` and any other NAMM option), ``tasks`` (``n_prompts``, ``n_tokens`` (a length or a
    curriculum, :func:`n_tokens_at`), ``seed``, ``segment_len``; optional ``min_full_score``,
    ``fitness`` (``ratio`` or ``score``, see :func:`namm_fitness`), ``resample`` (new prompts every
    generation), ``held_out_prompts`` (size of the held-out set, default ``n_prompts``)), ``evolution``
    (fields of :class:`EvolutionConfig`), ``init`` (a scorer file or folder to start from; default
    the untrained scorer), ``out`` (run folder), ``scorer_out``, ``checkpoint_out``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evolution config at {str(path)!r}; the shipped one is recipes/configs/evolve/namm.yaml")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = set(config) - _EVOLVE_SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; valid: {sorted(_EVOLVE_SECTIONS)}")
    EvolutionConfig(**config.get("evolution", {}))  # raises on unknown or bad options
    _check_tasks(path, config.get("tasks", {}))
    from ..tasks.retrieval import TASKS

    bad = {c["task"] for c in config.get("evolution", {}).get("curriculum", [])} - set(TASKS)
    if bad:
        raise ValueError(f"{path}: unknown task(s) {sorted(bad)} in the curriculum; available: {sorted(TASKS)}")
    config.setdefault("name", path.stem)
    return config


def _backbone_path(candidates: str | Sequence[str]) -> Path:
    candidates = [candidates] if isinstance(candidates, str) else list(candidates)
    for c in candidates:
        if (Path(c) / "config.json").is_file():
            return Path(c)
    raise FileNotFoundError(f"no backbone checkpoint at any of {candidates}; train one first (memzoo passkey train ...)")


def _models(config: dict):
    """(backbone path, trainer step or None, namm model, full model) as the config says."""
    import memzoo

    path = _backbone_path(config["backbone"])
    source = memzoo.load(path).eval()
    state_file = path.parent / "trainer_state.json"  # a run's last/model: record which step it was
    step = json.loads(state_file.read_text()).get("step") if state_file.is_file() else None
    full = memzoo.swap_memory(source, "full").eval() if source.config.memory != "full" else source
    namm = memzoo.swap_memory(source, "namm", **config["memory"]).eval()
    return path, step, namm, full


def _task_sets(config: dict, names: Sequence[str], generation: int = 0) -> dict:
    """The prompts of ``generation``: the same set every generation, unless ``tasks.resample``."""
    t = config["tasks"]
    seed = t["seed"] + (RESAMPLE_SEED + generation if t.get("resample") else 0)
    return _prompt_sets(tuple(names), t["n_prompts"], n_tokens_at(t, generation), seed)


@functools.lru_cache(maxsize=2)  # a fixed set is built once (and keeps its full-cache scores, see namm_fitness)
def _prompt_sets(names: tuple[str, ...], n_prompts: int, n_tokens: int, seed: int) -> dict:
    from ..tasks.retrieval import make_task

    return {n: make_task(n, n_prompts, n_tokens, seed) for n in names}


def evolve_namm(
    config: dict,
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    command: str = "",
    export: bool = True,
    allow_changed: bool = False,
    **overrides,
) -> dict:
    """Evolve a NAMM scorer for a trained backbone as ``config`` says (rank 0 then exports it).

    Args:
        config: from :func:`load_evolve_config`.
        out: run folder (default ``config["out"]``); resumes from ``out/state``.
        resume: False starts over (the old state is ignored and overwritten).
        progress: tqdm bar on rank 0.
        command: the command line, for the model cards.
        export: ship the best scorer to the config's ``scorer_out`` and ``checkpoint_out`` at the
            end (:func:`export_namm`). False for an exploratory run that must not replace shipped
            checkpoints; :func:`export_namm` ships it later if it turns out better.
        allow_changed: resume although the config changed since the state was saved (see :class:`Evolution`).
        **overrides: fields of :class:`EvolutionConfig` (e.g. ``max_minutes``, ``generations``).

    Returns:
        the run summary (also ``out/run.json``).
    """
    out = Path(out or config["out"])
    evo_cfg = EvolutionConfig(**(config.get("evolution", {}) | overrides))
    path, step, namm, full = _models(config)
    names = sorted({c["task"] for c in evo_cfg.curriculum}, key=[c["task"] for c in evo_cfg.curriculum].index)
    from ..memories.namm import load_namm_parameters, namm_parameters

    t = config["tasks"]
    options = dict(segment_len=t.get("segment_len", 128), min_full_score=t.get("min_full_score", MIN_FULL_SCORE),
                   relative=t.get("fitness", "ratio") == "ratio")  # fmt: skip
    changing = t.get("resample") or not isinstance(t["n_tokens"], int)
    fitness = namm_fitness(namm, full, (lambda g: _task_sets(config, names, g)) if changing else _task_sets(config, names), **options)
    held_out = None
    if evo_cfg.held_out_every:  # a fixed set at the length the run aims at, never used for selection
        held = namm_fitness(namm, full, _prompt_sets(tuple(names), t.get("held_out_prompts", t["n_prompts"]),
                                                     n_tokens_at(t, math.inf), t["seed"] + HELD_OUT_SEED), **options)  # fmt: skip
        held_out = lambda x: held(x, names)  # noqa: E731
    if not resume and out.exists():
        shutil.rmtree(out / "state", ignore_errors=True)
    x0 = load_namm_parameters(config["init"]) if config.get("init") else namm_parameters(namm)
    run = {"backbone": str(path), "memory": config["memory"], "tasks": config["tasks"], "init": config.get("init")}
    evo = Evolution(fitness, x0.double().numpy(), evo_cfg, out, resume=resume, held_out=held_out, run=run, allow_changed=allow_changed)
    summary = evo.run(progress=progress)
    summary |= {"backbone": str(path), "backbone_step": step, "full_scores": {k: {"score": v["score"], "accuracy": v["accuracy"]}
                                                                              for k, v in fitness.full_scores.items()},
                "evolution": asdict(evo_cfg), "memory": config["memory"], "tasks": config["tasks"], "init": config.get("init"),
                "best_held_out": evo.best_held_out if evo.best_held_out_x is not None else None,
                "best_held_out_generation": evo.best_held_out_generation, "command": command}  # fmt: skip
    if evo.changes:
        summary["changed_on_resume"] = evo.changes
    if evo.rank == 0:
        (out / "run.json").write_text(json.dumps(summary, indent=1))
        if export:
            export_namm(config, out)
    return summary


def export_namm(config: dict, run: str | Path | None = None) -> tuple[Path, Path]:
    """Ship a run's vector: ``scorer_out`` (safetensors + card) and ``checkpoint_out`` (the backbone with it).

    Which vector: ``evolution.export`` (:class:`EvolutionConfig`): the best candidate, the last mean, or
    the mean that scored best on the held-out prompts. Works on an unfinished run too (the best so
    far; the card says how many generations).
    """
    import memzoo

    from ..memories.namm import load_namm_parameters, save_namm_parameters, set_namm_parameters

    run = Path(run or config["out"])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    export = summary.get("evolution", config["evolution"]).get("export", "best")
    if not (run / EXPORTS[export]).is_file():
        raise FileNotFoundError(f"{run} has no {EXPORTS[export]} to export ({export!r}): no held-out score yet? Run more generations")
    vector = load_namm_parameters(run / EXPORTS[export])
    scorer_dir, ckpt_dir = Path(config["scorer_out"]), Path(config["checkpoint_out"])
    save_namm_parameters(scorer_dir / "namm.safetensors", vector)
    if summary.get("backbone"):  # the backbone the run used, not whatever the config finds now
        path, step = Path(summary["backbone"]), summary.get("backbone_step")
        namm = memzoo.swap_memory(memzoo.load(path), "namm", **config["memory"]).eval()
    else:  # an unfinished run: the config's backbone
        path, step, namm, _ = _models(config)
    set_namm_parameters(namm, vector)
    namm.save_pretrained(ckpt_dir)
    evolved = {
        "generations": records[-1]["generation"],
        "popsize": summary.get("evolution", config["evolution"]).get("popsize"),
        "sigma0": summary.get("evolution", config["evolution"]).get("sigma0"),
        "best_fitness": records[-1]["best_fitness"],
        "exported": export,
        "fitness": config["tasks"].get("fitness", "ratio"),
        "held_out": max((r["held_out"] for r in records if r.get("held_out") is not None), default=None),
        "tasks": records[-1]["tasks"],
        "wall_s": records[-1]["wall_s"],
        "run": str(run),
        "complete": bool(summary),
        "backbone_step": summary.get("backbone_step", step),
        "scorer": str(scorer_dir / "namm.safetensors"),
    }
    info = {"derived_from": str(path), "evolved": evolved, "task": "passkey", "stored_dtype": "float32",
            "command": summary.get("command") or f"memzoo namm evolve --config recipes/configs/evolve/{config['name']}.yaml"}  # fmt: skip
    (ckpt_dir / "training.json").write_text(json.dumps(info, indent=1))
    shutil.copyfile(run / "log.jsonl", scorer_dir / "log.jsonl")  # the card's numbers, beside it (run folders are not shipped)
    _fitness_figure(records, scorer_dir / "fitness.png", relative=evolved["fitness"] == "ratio")
    _scorer_card(scorer_dir, info, records, config.get("notes", ""))
    from ..cards import write_card

    write_card(ckpt_dir)
    return scorer_dir, ckpt_dir


def _fitness_figure(records: list[dict], path: Path, relative: bool = True) -> None:
    import matplotlib.pyplot as plt

    from ..plots import save_figure  # (selects the file-only Agg backend)

    g = [r["generation"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(g, [r["best_fitness"] for r in records], label="best so far")
    ax.plot(g, [r["generation_median"] for r in records], label="population median")
    if all(r.get("mean_fitness") is not None for r in records):
        ax.plot(g, [r["mean_fitness"] for r in records], label="distribution mean")
    held = [(r["generation"], r["held_out"]) for r in records if r.get("held_out") is not None]
    if held:
        ax.plot(*zip(*held), "o-", color="black", label="mean, held-out prompts")
    for r0, r1 in zip(records, records[1:]):
        if r0["tasks"] != r1["tasks"]:
            ax.axvline(r1["generation"] - 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("generation")
    if relative:
        ax.axhline(1.0, color="black", lw=0.5)
    ax.set_ylabel("fitness (score / full-cache score)" if relative else "fitness (answer score, exp(-mean CE))")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def fitness_table(records: list[dict]) -> str:
    """Markdown table of a run's ``log.jsonl`` records: one row per generation."""
    lines = ["| generation | tasks | best so far | population best | median | mean vector | mean, held out | sigma | wall s |",
             "|---" * 9 + "|"]  # fmt: skip
    for r in records:
        mean = f"{r['mean_fitness']:.4f}" if r.get("mean_fitness") is not None else "-"
        held = f"{r['held_out']:.4f}" if r.get("held_out") is not None else "-"
        lines.append(f"| {r['generation']} | {'+'.join(r['tasks'])} | {r['best_fitness']:.4f} | {r['generation_best']:.4f} | "
                     f"{r['generation_median']:.4f} | {mean} | {held} | {r['sigma']:.4f} | {r['wall_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


_EXPORT_WORDS = {
    "best": "the best candidate seen (on its generation's prompts)",
    "mean": "the last distribution mean",
    "best_held_out": "the distribution mean that scored best on the held-out prompts",
}


def _scorer_card(folder: Path, info: dict, records: list[dict], notes: str = "") -> None:
    ev = info["evolved"]
    step = f" (trainer step {ev['backbone_step']})" if ev.get("backbone_step") is not None else ""
    lines = [
        "---", "library_name: memzoo", "tags: [memzoo, namm, kv-cache, cma-es]", "---",
        f"# {folder.name}", "",
        "An evolved NAMM scorer (arXiv 2410.13166): the 4,172 parameters of the BAM network that decides which cached "
        "tokens stay, as one flat vector (`namm.safetensors`, key `namm`).", "",
        "```python", "import memzoo", "from memzoo.memories.namm import load_namm_parameters, set_namm_parameters",
        'model = memzoo.swap_memory(memzoo.load("checkpoints/passkey-full"), "namm", budget=256, evict_every=128)',
        f'set_namm_parameters(model, load_namm_parameters("{folder}/namm.safetensors"))',
        "# or with any transformers model: memzoo.hf.EvictingCache('namm', budget=256, evict_every=128, "
        f"scorer='{folder}/namm.safetensors')", "```", "",
        "## Evolution", "",
        f"Command: `{info['command']}`", "",
        f"- backbone: `{info['derived_from']}`{step}",
        f"- CMA-ES (`cma`, separable), population {ev['popsize']}, sigma0 {ev['sigma0']}: {ev['generations']} generations "
        f"in {ev['wall_s'] / 60:.1f} min" + ("" if ev["complete"] else " (**best so far of an unfinished run**)"),
        ("- fitness: task score (exp(-mean CE) of the answer, `memzoo.tasks.retrieval`) with the NAMM / with a full cache, "
         "same prompts, mean over tasks" if ev.get("fitness", "ratio") == "ratio" else
         "- fitness: task score (exp(-mean CE) of the answer, `memzoo.tasks.retrieval`) with the NAMM, mean over tasks")
        + f"; final tasks {', '.join(ev['tasks'])}; best candidate {ev['best_fitness']:.4f}"
        + (f"; best mean on the held-out prompts {ev['held_out']:.4f}" if ev.get("held_out") is not None else ""),
        f"- shipped vector: {_EXPORT_WORDS[ev.get('exported', 'best')]}",
        f"- log: `log.jsonl` (a copy of `{ev['run']}/log.jsonl`, one line per generation)", "",
        *([notes.strip(), ""] if notes else []),
        "![fitness](fitness.png)", "",
        fitness_table(records),
    ]  # fmt: skip
    (folder / "README.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ comparison
def compare_policies(config: dict, checkpoint: str | Path, designs: Sequence[str] = ("namm", "h2o", "l2", "window"), *,
                     n_prompts: int = 16, seed_offset: int = 1000, tasks: Sequence[str] = ("passkey", "book")) -> dict:  # fmt: skip
    """Answer score/probability/accuracy of the evolved NAMM and other policies at equal cache size.

    The prompts are held out from the evolution's (task seed + ``seed_offset``); every design is the
    same backbone (``checkpoint``'s weights) with its own policy at ``config["memory"]``'s budget and rhythm.
    """
    import memzoo

    from ..config import BACKBONE_FIELDS
    from ..registry import memory_config
    from ..tasks.retrieval import make_task, score_answers

    source = memzoo.load(checkpoint).eval()  # the namm checkpoint: its scorer is the evolved one
    # The backbone alone (swap_memory refuses to drop the scorer's weights): every design gets these exact weights,
    # not those of the training run the checkpoint came from, which may have moved on since.
    backbone = memzoo.build("full", **{k: getattr(source.config, k) for k in BACKBONE_FIELDS}).eval()
    weights = {k: v for k, v in source.state_dict().items() if k in backbone.state_dict()}
    backbone.load_state_dict(weights, strict=True)
    t = config["tasks"]
    n_tokens = n_tokens_at(t, math.inf)  # the length the evolution aimed at
    sets = {n: make_task(n, n_prompts, n_tokens, t["seed"] + seed_offset) for n in tasks}
    results = {"checkpoint": str(checkpoint), "memory": config["memory"], "n_prompts": n_prompts, "n_tokens": n_tokens,
               "seed": t["seed"] + seed_offset, "designs": {}}  # fmt: skip
    models = {"full": backbone}
    for d in designs:  # each at the same budget and rhythm; options another design lacks (NAMM's features) are left out
        fields = {f.name for f in dataclasses.fields(memory_config(d))}
        options = {k: v for k, v in config["memory"].items() if k in fields}
        models[d] = source if d == source.config.memory else memzoo.swap_memory(backbone, d, **options).eval()
    for d, model in models.items():
        row = {}
        for name, s in sets.items():
            start = time.perf_counter()
            r = score_answers(model, s, t.get("segment_len", 128))
            seconds = time.perf_counter() - start
            row[name] = {k: r[k] for k in ("score", "prob", "accuracy", "mean_ce")} | {
                "seconds": round(seconds, 2), "tokens_per_s": round(n_prompts * n_tokens / seconds)}  # fmt: skip
        results["designs"][d] = row
    for row in results["designs"].values():
        for name in sets:
            row[name]["ratio_to_full"] = row[name]["score"] / results["designs"]["full"][name]["score"]
    return results
