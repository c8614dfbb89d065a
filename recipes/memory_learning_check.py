"""Learning check for a compressive memory: does a tiny model learn to recall, through its memory, a fact from segment 1?

Task (synthetic, byte-sized ids): a stream of ``n_segments`` segments of ``segment_len`` tokens.
Somewhere in the first segment sits the fact ``MARK v`` (v one of ``n_values`` value tokens); every
other token is filler. The last token of every later segment is ``QUERY``, whose answer is v. Local
attention never crosses a segment boundary (``infini``, ``titans-mac``: attention within the
segment; ``titans-mag``/``titans-mal``: a sliding window of ``segment_len`` tokens, so the query
sees its own segment only; ``titans-lmm`` has no attention), so from segment 2 on the answer can
only come through the memory. Chance is 1 / n_values.

The model is trained with the shared :class:`memzoo.training.Trainer` (AdamW through
``param_groups``, so the gates get their ``optim_overrides``: higher lr, no decay) for a few
CPU-minutes, then evaluated on fresh streams twice: as is, and with the memory knocked out (a fresh
state after every segment, which is exactly what the model sees in its first segment; the weights
are untouched). Results go to JSON.

    python recipes/memory_learning_check.py --design titans-mac --out runs/learning-check/titans-mac.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import memzoo
from memzoo.bench import machine_info
from memzoo.model import IGNORE_INDEX, shift_labels
from memzoo.training import TrainConfig, Trainer

MARK, QUERY = 5, 6  # control tokens, never used as filler or values
VALUE0 = 10  # values are ids VALUE0 .. VALUE0 + n_values - 1
KEY0 = 40  # with several facts, keys are ids KEY0 .. KEY0 + n_keys - 1
FILLER = (100, 228)  # filler ids [lo, hi)


@dataclass
class CheckConfig:
    """Sizes of the check (defaults: a few CPU-minutes on one thread)."""

    design: str = "infini"  # infini, infini-linear, titans-lmm, titans-mac, titans-mag, titans-mal
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    segment_len: int = 32
    n_segments: int = 4  # the fact sits in the first; queries end segments 2..n
    n_values: int = 16
    # facts in segment 1: 1 = ``MARK v``, queried by ``QUERY``; more = ``MARK key v`` triples with distinct keys,
    # each later segment ending ``key QUERY`` for one of them (associative recall carried across segments)
    n_facts: int = 1
    n_keys: int = 32
    batch_size: int = 32
    steps: int = 600
    max_minutes: float = 5.0
    lr: float = 3e-3
    warmup_steps: int = 30
    eval_streams: int = 512
    # evaluate at the training length, twice it, and far beyond: 128 x 32 = 4K and 512 x 32 = 16K tokens,
    # where forgetting decides (a write kept with (1 - alpha) per token: 0.999^16384 = 8e-8, 0.99999^16384 = 0.85)
    eval_segments: tuple[int, ...] = (4, 8, 128, 512)
    threads: int = 1
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)  # the design's own options, e.g. {"norm_gain": False}


def make_batch(cfg: CheckConfig, batch_size: int, n_segments: int, generator: torch.Generator) -> dict:
    """input_ids / labels [batch, n_segments * segment_len + 1]: fact in segment 1, a query at the end of each later one.

    Labels follow transformers (the trainer shifts them): the value a query asks for is the label of
    the position after it. The last query's answer lies past the stream, so one token (the value)
    is appended; being last, it changes no earlier prediction.
    """
    if cfg.n_facts > 1:
        return _make_fact_batch(cfg, batch_size, n_segments, generator)
    S, n = cfg.segment_len, n_segments * cfg.segment_len
    ids = torch.randint(*FILLER, (batch_size, n), generator=generator)
    values = VALUE0 + torch.randint(cfg.n_values, (batch_size,), generator=generator)
    where = torch.randint(S - 2, (batch_size,), generator=generator)  # MARK at where, v at where + 1 (both in segment 1)
    rows = torch.arange(batch_size)
    ids[rows, where], ids[rows, where + 1] = MARK, values
    queries = torch.arange(2 * S - 1, n, S)  # the last token of segments 2..n
    ids[:, queries] = QUERY
    ids = torch.cat([ids, values[:, None]], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, queries + 1] = values[:, None]
    return {"input_ids": ids, "labels": labels}


def _make_fact_batch(cfg: CheckConfig, batch_size: int, n_segments: int, generator: torch.Generator) -> dict:
    """``n_facts`` triples ``MARK key v`` in segment 1 (distinct keys, non-overlapping); each later segment ends
    ``key QUERY`` for a fact drawn at random, whose value is the label after it."""
    S, n, F = cfg.segment_len, n_segments * cfg.segment_len, cfg.n_facts
    if 3 * F > S or F > cfg.n_keys:
        raise ValueError(f"{F} facts need segment_len >= {3 * F} and n_keys >= {F}; got {S} and {cfg.n_keys}")
    ids = torch.randint(*FILLER, (batch_size, n), generator=generator)
    keys = KEY0 + torch.rand(batch_size, cfg.n_keys, generator=generator).argsort(-1)[:, :F]  # [b, F] distinct
    values = VALUE0 + torch.randint(cfg.n_values, (batch_size, F), generator=generator)
    slots = torch.rand(batch_size, S // 3, generator=generator).argsort(-1)[:, :F] * 3  # [b, F] triple starts
    rows = torch.arange(batch_size)[:, None]
    ids[rows, slots], ids[rows, slots + 1], ids[rows, slots + 2] = MARK, keys, values
    queries = torch.arange(2 * S - 1, n, S)  # the last token of segments 2..n; the key sits before it
    asked = torch.randint(F, (batch_size, len(queries)), generator=generator)
    ids[:, queries - 1] = keys.gather(1, asked)
    ids[:, queries] = QUERY
    answers = values.gather(1, asked)  # [b, n_segments - 1]
    ids = torch.cat([ids, answers[:, -1:]], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, queries + 1] = answers
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def evaluate(model, cfg: CheckConfig, n_segments: int, *, knock_out: bool) -> list[float]:
    """Accuracy (argmax = v) at each query, i.e. after segments 2..n; streamed one segment per call.
    Streams of more than 8 segments are fewer (``eval_streams * 8 / n_segments``, at least 16)."""
    streams = max(16, cfg.eval_streams * 8 // max(n_segments, 8))  # long streams: fewer of them (about 128K tokens)
    batch = make_batch(cfg, min(streams, cfg.eval_streams), n_segments, torch.Generator().manual_seed(10_000 + n_segments))
    n = n_segments * cfg.segment_len  # the appended answer token is not streamed
    ids, targets = batch["input_ids"][:, :n], shift_labels(batch["labels"])[:, :n]
    state, hits = model.init_state(ids.shape[0]), []
    for start in range(0, n, cfg.segment_len):
        out = model(ids[:, start : start + cfg.segment_len], state=state)
        state = out.state
        if knock_out:  # a fresh memory after every segment: what the model sees in its first segment
            state = model.init_state(ids.shape[0])
        wanted = targets[:, start : start + cfg.segment_len]
        if start > 0:
            hits.append(float((out.logits[:, -1].argmax(-1) == wanted[:, -1]).float().mean()))
    return hits


#: the option that sets each design's local span to the check's segment (titans-lmm has none)
SPAN = {"infini": "segment_len", "infini-linear": "segment_len", "infini-deltanet": "segment_len", "titans-mac": "segment_len",
        "titans-mag": "window", "titans-mal": "window", "titans-lmm": None}  # fmt: skip


def gates(model) -> dict:
    """The memory gates the model learned, per layer: infini's sigmoid(beta) per head; Titans' mean
    eta, theta, alpha over heads at a zero input (the bias: the gate of a token that says nothing)."""
    if hasattr(model.blocks[0].mixer, "beta"):
        if model.blocks[0].mixer.beta is None:  # infini-deltanet reads its memory without a learned mix
            return {}
        return {"sigmoid_beta": [[round(float(g), 3) for g in blk.mixer.beta.detach().sigmoid()] for blk in model.blocks]}
    rows = []
    for blk in model.blocks:
        mem = blk.mixer.memory
        eta, theta, alpha = (torch.sigmoid(lin.bias.detach()) for lin in (mem.eta, mem.theta, mem.alpha))
        rows.append({"eta": float(eta.mean()), "theta": float(mem.config.max_lr * theta.mean()), "alpha": float(alpha.mean())})
    return {"titans_gates_at_zero_input": rows}


def run(cfg: CheckConfig, out: str | Path | None = None, command: str | None = None) -> dict:
    """Train, evaluate with and without memory, return (and write to ``out``) the results (with ``command``, the line that ran it)."""
    if cfg.design not in SPAN:
        raise ValueError(f"the learning check is for the compressive memories {sorted(SPAN)}, got {cfg.design!r}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    span = {SPAN[cfg.design]: cfg.segment_len} if SPAN[cfg.design] else {}
    model = memzoo.build(cfg.design, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, **span, **cfg.options)
    n = cfg.n_segments * cfg.segment_len
    train = TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        segment_len=n + 1,  # one call per stream (and its appended answer): full back-propagation through the memory
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
        "memory_config": dataclasses.asdict(model.blocks[0].mixer.config),  # every option, defaults included
        "steps": trainer.step,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(trainer.step * cfg.batch_size * n / seconds),
        "loss_first_last": [round(history[0]["loss"], 3), round(history[-1]["loss"], 3)],
        "chance": 1 / cfg.n_values,
        "machine": machine_info(),
    } | gates(model)
    for segs in cfg.eval_segments:
        hits = {kind: [round(a, 3) for a in evaluate(model, cfg, segs, knock_out=kind == "knocked_out")]
                for kind in ("memory", "knocked_out")}  # fmt: skip
        if segs <= 8:
            result[f"accuracy_per_query_{segs}seg"] = hits["memory"]
            result[f"accuracy_per_query_{segs}seg_knocked_out"] = hits["knocked_out"]
        # the last query: the fact (segs - 1) segments back
        result.setdefault("last_query", []).append(
            {"tokens": segs * cfg.segment_len, "with_memory": hits["memory"][-1], "knocked_out": hits["knocked_out"][-1]}
        )
    # headline: the last query at the training length (fact n_segments - 1 segments back)
    result["accuracy_with_memory"] = result[f"accuracy_per_query_{cfg.n_segments}seg"][-1]
    result["accuracy_memory_knocked_out"] = result[f"accuracy_per_query_{cfg.n_segments}seg_knocked_out"][-1]
    if command is not None:
        result["command"] = command
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", default=CheckConfig.design, help=", ".join(SPAN))
    parser.add_argument("--steps", type=int, default=CheckConfig.steps)
    parser.add_argument("--minutes", type=float, default=CheckConfig.max_minutes, help="training wall-time limit")
    parser.add_argument("--threads", type=int, default=CheckConfig.threads)
    parser.add_argument("--facts", type=int, default=CheckConfig.n_facts, help="facts to carry (1: MARK v; more: MARK key v triples)")
    parser.add_argument("--seed", type=int, default=CheckConfig.seed, help="initialisation and training data (evaluation rows are fixed)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="design options (YAML values), e.g. norm_gain=false forget_init=0.001")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON results (default runs/learning-check/DESIGN.json)")
    args = parser.parse_args(argv)
    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    cfg = CheckConfig(design=args.design, steps=args.steps, max_minutes=args.minutes, threads=args.threads, options=options,
                      n_facts=args.facts, seed=args.seed)  # fmt: skip
    out = args.out or f"runs/learning-check/{args.design}.json"
    command = " ".join(["python recipes/memory_learning_check.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(run(cfg, out, command=command), indent=1))


if __name__ == "__main__":
    main()
