"""Training with truncated back-propagation through time over segments, resumable exactly.

One optimisation step:

1. ``batch_fn(step, generator)`` makes the global batch (deterministic from the step, so a resumed
   run sees exactly the data it would have seen); under ``torch.distributed`` each rank takes its
   rows.
2. The sequence is fed ``segment_len`` tokens per call, carrying the memory state. The first
   ``no_grad_prefix`` tokens are streamed without gradients (cheap long histories: memory sees
   thousands of writes while back-propagation stays short). After every ``bptt_segments``
   segments the loss so far is back-propagated and the state detached (truncated BPTT).
3. Gradients are summed across ranks (the loss is normalised by the *global* label weight, so
   N ranks give exactly the gradient of one process on the combined batch), clipped, AdamW steps.

Checkpoints (``out_dir/last``) hold the model (safetensors + config + tokenizer), the optimizer
moments (safetensors) and the step (JSON), written atomically; ``fit()`` resumes from them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..io import atomic_directory, recover_directory
from ..model import IGNORE_INDEX, MemZooForCausalLM, shift_labels
from ..validation import bounds, check_fields, check_value
from .param_groups import param_groups
from .resume import check_same_run, truncate_log

__all__ = ["TrainConfig", "Trainer", "BatchFn", "weighted_loss", "token_cross_entropy"]

#: ``batch_fn(step, generator) -> {"input_ids": [B, n], "labels": [B, n], "loss_weights": [B, n] (optional),
#: "metric_masks": {name: bool [B, n]} (optional: the log gets ``ce_<name>``, the mean cross-entropy
#: of the predictions under each mask, e.g. the passkey answer digits)}``. Labels follow transformers
#: (``labels[:, t]`` is the token at t, -100 ignored); weights and masks are indexed like them (the
#: weight of predicting token t). The trainer shifts all of them once over the whole sequence.
BatchFn = Callable[[int, torch.Generator], dict]


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the recipe that learned passkey on this CPU in an early prototype).

    Attributes:
        steps: optimisation steps in all.
        lr: peak learning rate (AdamW), after ``warmup_steps`` of linear warm-up, then cosine to
            ``lr * min_lr_ratio``.
        weight_decay: AdamW decoupled decay (norms, biases, embeddings and parameters a design
            marks in ``optim_overrides`` get their own values, see ``param_groups``).
        betas: AdamW betas.
        grad_clip: global gradient-norm clip (0 = off).
        segment_len: tokens per forward call (the memory's unit of truncation).
        bptt_segments: back-propagate and detach the state every this many segments (0 = once per
            sequence: full BPTT through memory).
        no_grad_prefix: tokens at the start of every sequence streamed without gradients.
        autocast: "none", "bf16" (autocast; memory maths stays fp32 inside the designs) or "auto":
            bf16 where it is native (CUDA, or a CPU with avx512_bf16 / amx_bf16:
            :func:`memzoo.bench.native_bf16`), else none. Default "none": on CPUs without native
            bf16 (like this project's CI machine) bf16 matmuls run ~95x slower than fp32 (measured
            by `memzoo bench`: docs/results/bench/bench.json). "auto" is resolved when the trainer
            starts and kept with the run: a resume on a machine that resolves it otherwise is
            refused as a changed run (``allow_changed`` to accept it).
        log_every / save_every: in steps (save_every 0 = only at the end).
        max_minutes: stop (and save) after this wall time, even before ``steps`` (0 = no limit).
        seed: seeds the model init and the data.
        init_from: a checkpoint folder to warm-start from (every parameter with the same name and
            shape is copied, see :func:`~memzoo.training.warm_start.warm_start`; applied by
            :func:`~memzoo.training.recipe.train_recipe` before the first step). None = from scratch.
    """

    steps: int = field(default=1000, metadata=bounds(ge=1))
    lr: float = field(default=4e-3, metadata=bounds(ge=0))
    warmup_steps: int = field(default=50, metadata=bounds(ge=0))
    min_lr_ratio: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    weight_decay: float = field(default=0.1, metadata=bounds(ge=0))
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = field(default=1.0, metadata=bounds(ge=0))
    segment_len: int = field(default=256, metadata=bounds(ge=1))
    bptt_segments: int = field(default=0, metadata=bounds(ge=0))
    no_grad_prefix: int = field(default=0, metadata=bounds(ge=0))
    autocast: str = field(default="none", metadata=bounds(choices=("auto", "bf16", "none")))
    log_every: int = field(default=10, metadata=bounds(ge=1))
    save_every: int = field(default=100, metadata=bounds(ge=0))
    max_minutes: float = field(default=0.0, metadata=bounds(ge=0))
    seed: int = 0
    init_from: str | None = None
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run (e.g. the recipe name)

    def __post_init__(self):
        check_fields(self)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_value(f"betas[{i}]", beta, float, "TrainConfig.", ge=0, lt=1)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimisation step ``step`` (0-based): linear warm-up, cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy ``[b, n]`` in fp32 (0 where the label is -100). logits: [b, n, V].

    ``labels`` here are aligned with the logits (already shifted, :func:`~memzoo.model.shift_labels`).
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape)


def weighted_loss(logits: Tensor, labels: Tensor, weights: Tensor | None, ce: Tensor | None = None) -> Tensor:
    """Sum over tokens of weight x cross-entropy (labels -100 count 0). logits: [b, n, V].

    ``labels`` and ``weights`` are aligned with the logits (shifted, :func:`~memzoo.model.shift_labels`).

    ``ce``: the :func:`token_cross_entropy` of these logits when the caller already has it.
    """
    ce = token_cross_entropy(logits, labels) if ce is None else ce
    w = (labels != IGNORE_INDEX).float()
    if weights is not None:
        w = w * weights.float()
    return (ce * w).sum()


def _label_weight(labels: Tensor, weights: Tensor | None) -> Tensor:
    w = (labels != IGNORE_INDEX).float()
    return (w * weights.float()).sum() if weights is not None else w.sum()


class Trainer:
    """Trains a :class:`~memzoo.MemZooForCausalLM` on batches from ``batch_fn``.

    Args:
        model: the model (its parameters are updated in place).
        config: :class:`TrainConfig`.
        batch_fn: makes the global batch for a step (see :data:`BatchFn`).
        out_dir: where checkpoints (``last/``) and the log (``log.jsonl``) go; None = no files.
        run: the other settings that decide what is computed (a recipe's ``model`` and ``task``
            sections), stored with every checkpoint: a resume with other ones is refused.
        allow_changed: resume even if the settings changed (a warning names each change, and the
            checkpoint keeps the list of changes with the step they were made at).
    """

    def __init__(self, model: MemZooForCausalLM, config: TrainConfig, batch_fn: BatchFn, out_dir: str | Path | None = None,
                 *, run: dict | None = None, allow_changed: bool = False):  # fmt: skip
        self.model, self.config, self.batch_fn = model, config, batch_fn
        self.run_settings, self.allow_changed = dict(run or {}), allow_changed
        self.autocast = config.autocast
        if config.autocast == "auto":  # resolved once, and kept with the run so that a resume elsewhere is caught
            from ..bench import native_bf16

            self.autocast = "bf16" if native_bf16(next(model.parameters()).device) else "none"
            self.run_settings["autocast_resolved"] = self.autocast
        self.changes: list[dict] = []  # settings changed on resume (allow_changed): [{"step", "changes"}]
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.optimizer = torch.optim.AdamW(
            param_groups(model, config.lr, config.weight_decay), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        for group in self.optimizer.param_groups:
            group.setdefault("lr_mult", 1.0)  # param_groups sets it; the schedule scales every group by it
        self.step = 0
        self.train_seconds = 0.0  # wall time of all steps so far, across resumes
        # the CPUs that ran the steps, across resumes: [{"from_step", "to_step", "cpu_flags"}] (cards state them)
        self.machines: list[dict] = []

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimisation step; returns its metrics (loss is the global weighted mean)."""
        cfg, model = self.config, self.model
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        batch = self.batch_fn(self.step, gen)
        ids, labels, weights = batch["input_ids"], batch["labels"], batch.get("loss_weights")
        masks = dict(batch.get("metric_masks") or {})
        # transformers-style labels: shift the whole sequence once (weights and masks with it), so
        # the prediction across every segment boundary below is trained.
        labels = shift_labels(MemZooForCausalLM._check_labels(labels, ids))
        weights = shift_labels(weights, 0.0) if weights is not None else None
        masks = {name: shift_labels(mask, False) for name, mask in masks.items()}
        total_weight = _label_weight(labels, weights)  # over the global batch: every rank sees it
        if self.world > 1:
            if ids.shape[0] % self.world:
                raise ValueError(f"global batch {ids.shape[0]} does not split over {self.world} ranks")
            rows = slice(self.rank, None, self.world)
            ids, labels = ids[rows], labels[rows]
            weights = weights[rows] if weights is not None else None
            masks = {name: mask[rows] for name, mask in masks.items()}
        device = next(model.parameters()).device
        ids, labels = ids.to(device), labels.to(device)
        weights = weights.to(device) if weights is not None else None
        masks = {name: mask.to(device) for name, mask in masks.items()}
        # per mask: [sum of ce, count], summed over segments (and ranks) for the log
        mask_totals = {name: torch.zeros(2, dtype=torch.float64) for name in masks}

        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step) * group["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        state = model.init_state(ids.shape[0], device=device)
        n = ids.shape[1]
        prefix = min(cfg.no_grad_prefix, n - 1)
        if prefix:
            with torch.no_grad(), self._autocast():
                state = model.stream(ids[:, :prefix], cfg.segment_len, state=state).state
        pending, seg_count, loss_sum = 0.0, 0, 0.0
        for start in range(prefix, n, cfg.segment_len):
            end = min(n, start + cfg.segment_len)
            with self._autocast():
                out = model(ids[:, start:end], state=state)
            ce = token_cross_entropy(out.logits, labels[:, start:end])
            part = weighted_loss(out.logits, labels[:, start:end], weights[:, start:end] if weights is not None else None, ce=ce)
            for name, mask in masks.items():
                piece = mask[:, start:end]
                mask_totals[name] += torch.stack([ce.detach()[piece].sum().double(), piece.sum().double()]).cpu()
            pending = pending + part / total_weight.clamp_min(1e-9)
            state, seg_count = out.state, seg_count + 1
            last = end == n
            if last or (cfg.bptt_segments and seg_count % cfg.bptt_segments == 0):
                if isinstance(pending, Tensor) and pending.requires_grad:
                    pending.backward()
                loss_sum += float(pending.detach()) if isinstance(pending, Tensor) else pending
                pending, state = 0.0, state.detach()
        if self.world > 1:
            self._allreduce_grads()
            loss_t = torch.tensor([loss_sum])
            dist.all_reduce(loss_t)
            loss_sum = float(loss_t)
            for totals in mask_totals.values():
                dist.all_reduce(totals)
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:  # no clipping, but the norm is still checked (and logged)
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if not math.isfinite(loss_sum) or not math.isfinite(grad_norm):
            # Stop before the optimiser writes NaN into the weights: every later step would be NaN
            # too, and a NaN model would be saved over the last good checkpoint.
            raise FloatingPointError(
                f"training diverged at step {self.step + 1}: loss {loss_sum}, gradient norm {grad_norm}. "
                "The weights are left as they were after the previous step (and the last saved checkpoint "
                "is intact): lower train.lr, or train.grad_clip, and resume or restart"
            )
        self.optimizer.step()
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            # finite gradients can still give non-finite weights (an lr of 1e30): nothing is saved
            raise FloatingPointError(
                f"training diverged at step {self.step + 1}: the update made {len(bad)} weight tensor(s) non-finite "
                f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}) with finite loss {loss_sum:.4g} and gradient norm "
                f"{grad_norm:.4g}. Nothing was saved from this step (the last saved checkpoint is intact; the weights "
                "in memory are not): lower train.lr, and resume or restart"
            )
        self.step += 1
        metrics = {
            "step": self.step,
            "loss": loss_sum,
            "lr": cfg.lr_at(self.step - 1),
            "grad_norm": grad_norm,
            "tokens": int(ids.numel()) * self.world,
        }
        for name, (ce_sum, count) in mask_totals.items():
            metrics[f"ce_{name}"] = float(ce_sum / count) if count else float("nan")
        return metrics

    def _autocast(self):
        enabled = self.autocast == "bf16"
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)

    def _allreduce_grads(self) -> None:
        # Sum, not mean: each rank's loss is already normalised by the global label weight.
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = True, progress: bool = True, on_save: Callable[[Trainer], None] | None = None) -> list[dict]:
        """Train until ``config.steps`` (or ``max_minutes``), saving every ``save_every`` steps.

        Args:
            resume: continue from ``out_dir/last`` if it exists (exactly: same data, same moments).
            progress: tqdm bar (rank 0 only).
            on_save: called after each checkpoint (e.g. to evaluate).

        Returns:
            the metrics of every step run in this call.
        """
        cfg = self.config
        if resume and self.out_dir is not None:
            if self.rank == 0:  # a save killed between its two renames left its copy as .last.old
                recover_directory(self.out_dir / "last")
            if self.world > 1:
                dist.barrier()
        if resume and self.out_dir is not None and (self.out_dir / "last").is_dir():
            self.load_checkpoint(self.out_dir / "last")
        self._truncate_log()  # steps logged after the checkpoint (a kill) or by an earlier run (no resume) go
        self._record_machine()
        history, start_time, tokens, seconds_before = [], time.perf_counter(), 0, self.train_seconds
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or self.rank != 0, desc="train", unit="step")
        while self.step < cfg.steps:
            metrics = self.train_step()
            elapsed = time.perf_counter() - start_time
            self.train_seconds = seconds_before + elapsed
            tokens += metrics["tokens"]
            metrics.update(train_s=round(self.train_seconds, 2), tokens_per_s=round(tokens / max(elapsed, 1e-9)))
            history.append(metrics)
            self.machines[-1]["to_step"] = self.step
            bar.update(1)
            shown = {"loss": f"{metrics['loss']:.3f}"} | {k: f"{v:.2f}" for k, v in metrics.items() if k.startswith("ce_")}
            bar.set_postfix(shown, tok_s=metrics["tokens_per_s"])
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(metrics)
            out_of_time = self._out_of_time(elapsed)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps or out_of_time:
                self.save_checkpoint()
                if on_save is not None:
                    on_save(self)
            if out_of_time:
                break
        bar.close()
        return history

    def _record_machine(self) -> None:
        """Open this call's entry in :attr:`machines` (or extend the last one: same CPU, continuing where it stopped)."""
        from ..bench import cpu_flags

        flags = cpu_flags()
        last = self.machines[-1] if self.machines else None
        if last is None or last["cpu_flags"] != flags or last["to_step"] != self.step:
            self.machines.append({"from_step": self.step, "to_step": self.step, "cpu_flags": flags})

    def _out_of_time(self, elapsed: float) -> bool:
        """Past ``max_minutes``? Rank 0's clock decides for every rank, so all stop at the same step."""
        if not self.config.max_minutes:
            return False
        flag = torch.tensor(float(elapsed > 60 * self.config.max_minutes))
        if self.world > 1:  # each rank's clock differs a little: without this one rank stops, the others wait in all_reduce
            dist.broadcast(flag, 0)
        return bool(flag)

    def _truncate_log(self) -> None:
        """Keep only the log lines of steps up to the current one: the log then reads 1, 2, ... once."""
        if self.rank == 0 and self.out_dir is not None:
            truncate_log(self.out_dir / "log.jsonl", "step", self.step)

    def _log(self, metrics: dict) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Model + optimizer + step, atomically, to ``path`` (default ``out_dir/last``)."""
        if self.rank != 0 or (path is None and self.out_dir is None):
            return None
        path = Path(path) if path is not None else self.out_dir / "last"
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp / "model")
            tensors, meta = _flatten_optimizer(self.optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer_state.json").write_text(
                json.dumps(
                    {"step": self.step, "train_seconds": self.train_seconds, "optimizer": meta, "config": asdict(self.config),
                     "run": self.run_settings, "changes": self.changes, "machines": self.machines},  # fmt: skip
                    indent=1,
                )
            )
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model weights, optimizer moments and step from a :meth:`save_checkpoint` folder."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        self.changes = list(state.get("changes", []))
        changes = _check_same_run(state, {"config": asdict(self.config), "run": self.run_settings}, path, self.allow_changed)
        if changes:
            self.changes.append({"step": int(state["step"]), "changes": changes})
        weights = load_file(str(path / "model" / "model.safetensors"))
        own = self.model.state_dict()
        missing = set(own) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {path} lacks {sorted(missing)[:5]}...: was it made for another design/config?")
        self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items() if k in own})
        _load_optimizer(self.optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.machines = [dict(m) for m in state.get("machines", [])]  # a run saved before machines were kept: none


#: TrainConfig fields a resumed run may change: they do not change what is computed, except
#: ``steps`` (training longer is legitimate, but the schedule and curriculum stretch: a warning says so)
_RESUMABLE_CHANGES = frozenset(f"config.{k}" for k in ("max_minutes", "log_every", "save_every", "extra", "steps"))


def _check_same_run(state: dict, current: dict, path: Path, allow_changed: bool) -> list[str]:
    """Refuse to resume a checkpoint made with other settings (see :func:`~memzoo.training.resume.check_same_run`)."""
    saved_steps, steps = state.get("config", {}).get("steps", current["config"]["steps"]), current["config"]["steps"]
    if saved_steps != steps:
        warnings.warn(
            f"resuming {path} with steps {saved_steps} -> {steps}: the learning-rate schedule and the "
            "curriculum are stretched from here on, so the run is no longer the one a fresh start would give",
            stacklevel=3,
        )
    saved = {"config": state.get("config", {}), "run": state.get("run", {})}
    if "run" not in state:  # saved before runs stored their model and task sections: compare what it has
        current = {"config": current["config"]}
        saved = {"config": saved["config"]}
    if not saved["config"]:
        current = {k: v for k, v in current.items() if k != "config"}
    return check_same_run(saved, current, path, may_change=_RESUMABLE_CHANGES, allow_changed=allow_changed)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """AdamW state as flat tensors (safetensors, no pickle) + JSON metadata."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{idx}.{key}"] = value.detach().clone().contiguous() if isinstance(value, Tensor) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
