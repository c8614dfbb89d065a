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

from ..io import atomic_directory

__all__ = ["EvolutionConfig", "Evolution", "namm_fitness", "load_cma_state", "save_cma_state"]

# Objects of a cma.CMAEvolutionStrategy whose numeric attributes make up its state (see the module docstring).
_PARTS = ("es", "adapt_sigma", "sigma_vec", "sm", "best")
# Attributes not restored: inputs and logs that do not steer ask/tell, or that hold the last population only.
# The sampler's _mueff/_lam key a cache of learning rates that is not stored: restoring the key alone would
# make cma believe the (missing) cache is valid.
_SKIP = {"ary", "pop_sorted", "x0", "mean0", "sigma0", "sigma_vec0", "inputargs", "inopts", "N", "N_pheno", "dimension", "_mueff", "_lam"}


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
    """

    popsize: int = 32
    sigma0: float = 0.065
    generations: int = 100
    curriculum: list[dict] = field(default_factory=lambda: [{"task": "passkey", "from_generation": 0}])
    seed: int = 0
    diagonal: bool = True
    max_minutes: float | None = None
    evaluate_mean: bool = True

    def __post_init__(self):
        if self.popsize < 2 or self.sigma0 <= 0:
            raise ValueError(f"need popsize >= 2 and sigma0 > 0, got popsize={self.popsize}, sigma0={self.sigma0}")
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


def save_cma_state(es, folder: str | Path, extra: dict | None = None) -> None:
    """Write an ES's state as ``cma.safetensors`` (arrays) + ``state.json`` (scalars), no pickle.

    Args:
        es: a ``cma.CMAEvolutionStrategy`` made by this module (it carries its random generator).
        folder: written atomically (a temporary folder, then renamed over).
        extra: JSON-serialisable values stored beside the ES's (e.g. the generation).
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
            Deterministic: every rank must get the same number for the same call.
        x0: [n] the start (the mean of the first generation).
        config: :class:`EvolutionConfig`.
        out_dir: ``log.jsonl`` (a line per generation), ``best.safetensors`` (the best vector, key ``namm``),
            ``state/`` (the resumable state). Rank 0 writes; None = nothing written.

    Example:
        >>> evo = Evolution(namm_fitness(namm_model, full_model, tasks), x0, EvolutionConfig(), "runs/namm-evolve")
        >>> evo.run()  # resumes from runs/namm-evolve/state if present
    """

    def __init__(self, evaluate: Evaluate, x0, config: EvolutionConfig, out_dir: str | Path | None = None, *, resume: bool = True):
        self.evaluate, self.config = evaluate, config
        self.x0 = np.asarray(x0, dtype=np.float64).ravel()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank, self.world = _rank_world()
        self.generation, self.wall_s = 0, 0.0
        self.best_fitness, self.best_details, self.best_tasks = -math.inf, {}, []
        self.best_x = self.x0.copy()
        state = self.out_dir / "state" if self.out_dir is not None else None
        if resume and state is not None and (state / "state.json").is_file():
            self.es, extra = load_cma_state(state, self.x0, config)
            self.generation, self.wall_s = extra["generation"], extra["wall_s"]
            self.best_fitness, self.best_details, self.best_tasks = extra["best_fitness"], extra["best_details"], extra["best_tasks"]
            self.best_x = np.asarray(json.loads((state / "best_x.json").read_text()), dtype=np.float64)  # JSON floats round-trip exactly
        else:
            self.es = _new_es(self.x0, config)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean [n]."""
        return np.asarray(self.es.mean, dtype=np.float64).copy()

    def _evaluate_all(self, candidates: list[np.ndarray], tasks: list[str]) -> tuple[np.ndarray, list[dict]]:
        """Fitness of every candidate, each computed on one rank, then shared (identical on every rank)."""
        fits = torch.zeros(len(candidates), dtype=torch.float64)
        details: list[dict] = [{} for _ in candidates]
        for i in range(self.rank, len(candidates), self.world):
            fits[i], details[i] = self.evaluate(candidates[i], tasks)
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
        seconds = time.perf_counter() - start
        self.wall_s += seconds
        self.generation += 1
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
        save_namm_parameters(self.out_dir / "best.safetensors", torch.from_numpy(self.best_x))
        extra = {"generation": self.generation, "wall_s": self.wall_s, "best_fitness": self.best_fitness,
                 "best_details": self.best_details, "best_tasks": self.best_tasks, "config": asdict(self.config)}  # fmt: skip
        save_cma_state(self.es, self.out_dir / "state", extra)
        (self.out_dir / "state" / "best_x.json").write_text(json.dumps([float(v) for v in self.best_x]))

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
    namm_model, full_model, tasks: dict, segment_len: int = 128, full_scores: dict | None = None, min_full_score: float = MIN_FULL_SCORE
) -> Evaluate:
    """The NAMM fitness: mean over the active tasks of score(NAMM) / score(full cache), same prompts.

    Args:
        namm_model: a memzoo ``namm`` model (its scorer is overwritten by each candidate).
        full_model: the same backbone with ``full`` memory.
        tasks: ``{name: RetrievalSet}`` (:mod:`memzoo.tasks.retrieval`).
        segment_len: tokens per forward call while streaming.
        full_scores: ``{name: score_answers result}`` of the full cache, if known; missing ones are
            computed on first use and kept (``evaluate.full_scores``).
        min_full_score: a task whose full-cache score is below this raises ValueError (its ratio
            would be noise, see :data:`MIN_FULL_SCORE`).

    Returns:
        ``evaluate(vector, task_names) -> (fitness, {task: {"ratio", "score", "accuracy", "prob"}})``.
    """
    from ..memories.namm import set_namm_parameters
    from ..tasks.retrieval import score_answers

    cache = dict(full_scores or {})

    def evaluate(vector: np.ndarray, names: Sequence[str]) -> tuple[float, dict]:
        set_namm_parameters(namm_model, torch.as_tensor(np.asarray(vector), dtype=torch.float32))
        details = {}
        for name in names:
            if name not in cache:
                cache[name] = score_answers(full_model, tasks[name], segment_len)
            _check_informative(name, cache[name]["score"], min_full_score)
            r = score_answers(namm_model, tasks[name], segment_len)
            details[name] = {"ratio": r["score"] / cache[name]["score"], "score": r["score"], "accuracy": r["accuracy"], "prob": r["prob"]}
        return float(np.mean([d["ratio"] for d in details.values()])), details

    evaluate.full_scores = cache
    return evaluate


# ------------------------------------------------------------------------------------ the NAMM recipe
_EVOLVE_SECTIONS = {"name", "backbone", "memory", "tasks", "evolution", "out", "scorer_out", "checkpoint_out", "notes"}


def load_evolve_config(path: str | Path) -> dict:
    """Read and check an evolution YAML (``recipes/configs/evolve/namm.yaml``).

    Sections: ``backbone`` (checkpoint folders, the first that exists is used), ``memory`` (``budget``,
    ``evict_every``), ``tasks`` (``n_prompts``, ``n_tokens``, ``seed``, ``segment_len``, optional
    ``min_full_score``), ``evolution``
    (fields of :class:`EvolutionConfig`), ``out`` (run folder), ``scorer_out``, ``checkpoint_out``.
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


def _task_sets(config: dict, names: Sequence[str], seed_offset: int = 0) -> dict:
    from ..tasks.retrieval import make_task

    t = config["tasks"]
    return {n: make_task(n, t["n_prompts"], t["n_tokens"], t["seed"] + seed_offset) for n in names}


def evolve_namm(
    config: dict,
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    command: str = "",
    export: bool = True,
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
        **overrides: fields of :class:`EvolutionConfig` (e.g. ``max_minutes``, ``generations``).

    Returns:
        the run summary (also ``out/run.json``).
    """
    out = Path(out or config["out"])
    evo_cfg = EvolutionConfig(**(config.get("evolution", {}) | overrides))
    path, step, namm, full = _models(config)
    names = sorted({c["task"] for c in evo_cfg.curriculum}, key=[c["task"] for c in evo_cfg.curriculum].index)
    from ..memories.namm import namm_parameters

    fitness = namm_fitness(
        namm,
        full,
        _task_sets(config, names),
        segment_len=config["tasks"].get("segment_len", 128),
        min_full_score=config["tasks"].get("min_full_score", MIN_FULL_SCORE),
    )
    if not resume and out.exists():
        shutil.rmtree(out / "state", ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)
    evo = Evolution(fitness, namm_parameters(namm).double().numpy(), evo_cfg, out, resume=resume)
    summary = evo.run(progress=progress)
    summary |= {"backbone": str(path), "backbone_step": step, "full_scores": {k: {"score": v["score"], "accuracy": v["accuracy"]}
                                                                              for k, v in fitness.full_scores.items()},
                "evolution": asdict(evo_cfg), "memory": config["memory"], "tasks": config["tasks"], "command": command}  # fmt: skip
    if evo.rank == 0:
        (out / "run.json").write_text(json.dumps(summary, indent=1))
        if export:
            export_namm(config, out)
    return summary


def export_namm(config: dict, run: str | Path | None = None) -> tuple[Path, Path]:
    """Ship a run's best vector: ``scorer_out`` (safetensors + card) and ``checkpoint_out`` (the backbone with it).

    Works on an unfinished run too (the best so far; the card says how many generations).
    """
    import memzoo

    from ..memories.namm import load_namm_parameters, save_namm_parameters, set_namm_parameters

    run = Path(run or config["out"])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    vector = load_namm_parameters(run / "best.safetensors")
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
    _fitness_figure(records, scorer_dir / "fitness.png")
    _scorer_card(scorer_dir, info, records, config.get("notes", ""))
    from ..cards import write_card

    write_card(ckpt_dir)
    return scorer_dir, ckpt_dir


def _fitness_figure(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["generation"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(g, [r["best_fitness"] for r in records], label="best so far")
    ax.plot(g, [r["generation_median"] for r in records], label="population median")
    if all(r.get("mean_fitness") is not None for r in records):
        ax.plot(g, [r["mean_fitness"] for r in records], label="distribution mean")
    for r0, r1 in zip(records, records[1:]):
        if r0["tasks"] != r1["tasks"]:
            ax.axvline(r1["generation"] - 0.5, color="grey", ls=":", lw=1)
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (score / full-cache score)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fitness_table(records: list[dict]) -> str:
    """Markdown table of a run's ``log.jsonl`` records: one row per generation."""
    lines = ["| generation | tasks | best so far | population best | median | mean vector | sigma | wall s |", "|---" * 8 + "|"]
    for r in records:
        mean = f"{r['mean_fitness']:.4f}" if r.get("mean_fitness") is not None else "-"
        lines.append(f"| {r['generation']} | {'+'.join(r['tasks'])} | {r['best_fitness']:.4f} | {r['generation_best']:.4f} | "
                     f"{r['generation_median']:.4f} | {mean} | {r['sigma']:.4f} | {r['wall_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


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
        f"- fitness: task score (exp(-mean CE) of the answer, `memzoo.tasks.retrieval`) with the NAMM / with a full cache, "
        f"same prompts, mean over tasks; final tasks {', '.join(ev['tasks'])}; best {ev['best_fitness']:.4f}",
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
    from ..tasks.retrieval import make_task, score_answers

    source = memzoo.load(checkpoint).eval()  # the namm checkpoint: its scorer is the evolved one
    # The backbone alone (swap_memory refuses to drop the scorer's weights): every design gets these exact weights,
    # not those of the training run the checkpoint came from, which may have moved on since.
    backbone = memzoo.build("full", **{k: getattr(source.config, k) for k in BACKBONE_FIELDS}).eval()
    weights = {k: v for k, v in source.state_dict().items() if k in backbone.state_dict()}
    backbone.load_state_dict(weights, strict=True)
    t = config["tasks"]
    sets = {n: make_task(n, n_prompts, t["n_tokens"], t["seed"] + seed_offset) for n in tasks}
    results = {"checkpoint": str(checkpoint), "memory": config["memory"], "n_prompts": n_prompts, "n_tokens": t["n_tokens"],
               "seed": t["seed"] + seed_offset, "designs": {}}  # fmt: skip
    models = {"full": backbone}
    for d in designs:
        models[d] = source if d == source.config.memory else memzoo.swap_memory(backbone, d, **config["memory"]).eval()
    for d, model in models.items():
        row = {}
        for name, s in sets.items():
            start = time.perf_counter()
            r = score_answers(model, s, t.get("segment_len", 128))
            seconds = time.perf_counter() - start
            row[name] = {k: r[k] for k in ("score", "prob", "accuracy", "mean_ce")} | {
                "seconds": round(seconds, 2), "tokens_per_s": round(n_prompts * t["n_tokens"] / seconds)}  # fmt: skip
        results["designs"][d] = row
    for row in results["designs"].values():
        for name in sets:
            row[name]["ratio_to_full"] = row[name]["score"] / results["designs"]["full"][name]["score"]
    return results
