"""Learning check for ``infini``: does a tiny model learn to recall, through its memory, a fact from segment 1?

Task (synthetic, byte-sized ids): a stream of ``n_segments`` segments of ``segment_len`` tokens.
Somewhere in the first segment sits the fact ``MARK v`` (v one of ``n_values`` value tokens); every
other token is filler. The last token of every later segment is ``QUERY``, whose label is v. Local
attention never crosses a segment boundary, so from segment 2 on the answer can only come through
the compressive memory. Chance is 1 / n_values.

The model is trained with the shared :class:`memzoo.training.Trainer` (AdamW through
``param_groups``, so the gates get ``optim_overrides``: 10x lr, no decay) for a few CPU-minutes,
then evaluated on fresh streams twice: as is, and with the memory knocked out (M and z reset to
zero after every segment, which is exactly what the model sees in its first segment; local
attention and the gates are untouched). Results go to JSON.

    nice -n 10 python recipes/infini_learning_check.py --out results/infini_learning_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import memzoo
from memzoo.model import IGNORE_INDEX
from memzoo.training import TrainConfig, Trainer

MARK, QUERY = 5, 6  # control tokens, never used as filler or values
VALUE0 = 10  # values are ids VALUE0 .. VALUE0 + n_values - 1
FILLER = (100, 228)  # filler ids [lo, hi)


@dataclass
class CheckConfig:
    """Sizes of the check (defaults: a few CPU-minutes on one thread)."""

    design: str = "infini"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    segment_len: int = 32
    n_segments: int = 4  # the fact sits in the first; queries end segments 2..n
    n_values: int = 16
    batch_size: int = 32
    steps: int = 600
    max_minutes: float = 5.0
    lr: float = 3e-3
    warmup_steps: int = 30
    eval_streams: int = 512
    eval_segments: tuple[int, ...] = (4, 8)  # evaluate at the training length and at twice it
    threads: int = 1
    seed: int = 0


def make_batch(cfg: CheckConfig, batch_size: int, n_segments: int, generator: torch.Generator) -> dict:
    """input_ids / labels [batch, n_segments * segment_len]: fact in segment 1, a query at the end of each later one."""
    S, n = cfg.segment_len, n_segments * cfg.segment_len
    ids = torch.randint(*FILLER, (batch_size, n), generator=generator)
    values = VALUE0 + torch.randint(cfg.n_values, (batch_size,), generator=generator)
    where = torch.randint(S - 2, (batch_size,), generator=generator)  # MARK at where, v at where + 1 (both in segment 1)
    rows = torch.arange(batch_size)
    ids[rows, where], ids[rows, where + 1] = MARK, values
    labels = torch.full_like(ids, IGNORE_INDEX)
    queries = torch.arange(2 * S - 1, n, S)  # the last token of segments 2..n
    ids[:, queries] = QUERY
    labels[:, queries] = values[:, None]
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def evaluate(model, cfg: CheckConfig, n_segments: int, *, knock_out: bool) -> list[float]:
    """Accuracy (argmax = v) at each query, i.e. after segments 2..n; streamed one segment per call."""
    batch = make_batch(cfg, cfg.eval_streams, n_segments, torch.Generator().manual_seed(10_000 + n_segments))
    ids, labels = batch["input_ids"], batch["labels"]
    state, hits = model.init_state(ids.shape[0]), []
    for start in range(0, ids.shape[1], cfg.segment_len):
        out = model(ids[:, start : start + cfg.segment_len], state=state)
        state = out.state
        if knock_out:  # an empty memory after every segment: what the model sees in its first segment
            layers = [dataclasses.replace(s, M=torch.zeros_like(s.M), z=torch.zeros_like(s.z)) for s in state.layers]
            state = dataclasses.replace(state, layers=layers)
        lab = labels[:, start : start + cfg.segment_len]
        if start > 0:
            hits.append(float((out.logits[:, -1].argmax(-1) == lab[:, -1]).float().mean()))
    return hits


def run(cfg: CheckConfig, out: str | Path | None = None) -> dict:
    """Train, evaluate with and without memory, return (and write to ``out``) the results."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = memzoo.build(cfg.design, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, segment_len=cfg.segment_len)
    n = cfg.n_segments * cfg.segment_len
    train = TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        segment_len=n,  # one call per stream: full back-propagation through the memory
        autocast="none",  # a model this small runs faster in fp32 on a CPU
        log_every=50,
        save_every=0,
        max_minutes=cfg.max_minutes,
        seed=cfg.seed,
    )
    trainer = Trainer(model, train, lambda step, gen: make_batch(cfg, cfg.batch_size, cfg.n_segments, gen))
    start = time.perf_counter()
    history = trainer.fit(progress=False)
    seconds = time.perf_counter() - start
    model.eval()
    result = {
        "config": dataclasses.asdict(cfg),
        "steps": trainer.step,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(trainer.step * cfg.batch_size * n / seconds),
        "loss_first_last": [round(history[0]["loss"], 3), round(history[-1]["loss"], 3)],
        "chance": 1 / cfg.n_values,
        "gates_sigmoid_beta": [[round(float(g), 3) for g in blk.mixer.beta.detach().sigmoid()] for blk in model.blocks],
    }
    for segs in cfg.eval_segments:
        result[f"accuracy_per_query_{segs}seg"] = [round(a, 3) for a in evaluate(model, cfg, segs, knock_out=False)]
        result[f"accuracy_per_query_{segs}seg_knocked_out"] = [round(a, 3) for a in evaluate(model, cfg, segs, knock_out=True)]
    # headline: the last query at the training length (fact n_segments - 1 segments back)
    result["accuracy_with_memory"] = result[f"accuracy_per_query_{cfg.n_segments}seg"][-1]
    result["accuracy_memory_knocked_out"] = result[f"accuracy_per_query_{cfg.n_segments}seg_knocked_out"][-1]
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", default=CheckConfig.design, help="infini or infini-linear")
    parser.add_argument("--steps", type=int, default=CheckConfig.steps)
    parser.add_argument("--minutes", type=float, default=CheckConfig.max_minutes, help="training wall-time limit")
    parser.add_argument("--threads", type=int, default=CheckConfig.threads)
    parser.add_argument("--out", default="results/infini_learning_check.json")
    args = parser.parse_args(argv)
    cfg = CheckConfig(design=args.design, steps=args.steps, max_minutes=args.minutes, threads=args.threads)
    print(json.dumps(run(cfg, args.out), indent=1))


if __name__ == "__main__":
    main()
