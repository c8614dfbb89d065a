"""Whole-job time estimates for commands made of unequal parts (a compare over designs, the bench's streams).

A tqdm bar times the part that is running; what a researcher wants before walking away is the
whole job. The parts are not alike (``full`` at 64K tokens streams ~10x slower than ``infini``),
so counting finished parts misleads. :class:`JobClock` weighs each part by its estimated cost and
rescales the estimate by how long the finished parts really took::

    clock = JobClock({design: stream_cost(design, [4096, 65536]) for design in ("full", "infini")})
    for design in ("full", "infini"):
        print(f"{design}{clock.status()}")
        run(design)
        clock.finish(design)

The costs come from the streaming speeds in the committed bench results (``docs/results/bench/
bench.json``, one thread, fp32): only their ratios matter, so a machine faster or slower than the
bench's shifts every part alike and the rescaling absorbs it.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

#: the committed bench results whose stream speeds weigh the parts (absent outside a checkout: parts weigh their tokens)
BENCH_JSON = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench" / "bench.json"


@lru_cache(maxsize=4)
def _stream_speeds(path: Path) -> dict[str, list[tuple[int, float]]]:
    """design -> [(tokens, tokens/s)] sorted by tokens, from a bench JSON's fp32 stream rows ({} if unreadable)."""
    try:
        rows = json.loads(path.read_text()).get("stream", [])
    except (OSError, ValueError):
        return {}
    speeds: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("tokens_per_s") and r.get("dtype", "fp32") == "fp32" and "error" not in r:
            speeds.setdefault(r["design"], []).append((int(r["tokens"]), float(r["tokens_per_s"])))
    return {d: sorted(v) for d, v in speeds.items()}


def stream_speed(design: str, tokens: int, *, bench: Path = BENCH_JSON) -> float | None:
    """Tokens/s of ``design`` streaming ``tokens`` tokens, from the bench's rows.

    Between two measured lengths the speed follows the power law through them (log-log interpolation);
    below the shortest it is the shortest's; past the longest it follows the last two rows' power law
    with the exponent clamped to [-1, 0] (a design never speeds up with length, and full attention's
    cost per token at most grows linearly). None where the bench has no row of the design.
    """
    rows = _stream_speeds(bench).get(design)
    if not rows:
        return None
    if len(rows) == 1 or tokens <= rows[0][0]:
        return rows[0][1]
    upper = next((i for i, (n, _) in enumerate(rows) if n >= tokens), None)
    (n0, s0), (n1, s1) = rows[upper - 1 if upper else -2], rows[upper if upper else -1]
    slope = math.log(s1 / s0) / math.log(n1 / n0)
    if upper is None:  # past the longest row
        slope, (n0, s0) = min(0.0, max(-1.0, slope)), (n1, s1)
    return s0 * (tokens / n0) ** slope


def stream_cost(design: str, lengths: list[int], *, bench: Path = BENCH_JSON) -> float:
    """Relative cost of streaming one prompt of each length with ``design``: bench seconds where the bench
    knows the design, else tokens at the median design's speed (so unknown designs weigh like a typical one)."""
    speeds = _stream_speeds(bench)
    typical = sorted(s for rows in speeds.values() for _, s in rows)
    fallback = typical[len(typical) // 2] if typical else 1.0
    return sum(n / (stream_speed(design, n, bench=bench) or fallback) for n in lengths)


class JobClock:
    """The whole job's time so far and left, for parts of unequal estimated costs.

    Args:
        costs: part -> its relative cost (any unit: only ratios matter), for every part still to run.

    :meth:`finish` marks a part done (``done`` counts them), :meth:`drop` one that will not run after all
    (a stream skipped);
    the time left is the remaining cost at the speed the finished parts ran, measured against their cost.
    """

    def __init__(self, costs: dict):
        if any(c < 0 for c in costs.values()):
            raise ValueError(f"costs must be >= 0, got {costs}")
        self.todo, self.done, self.spent, self.start = dict(costs), 0, 0.0, time.perf_counter()

    def finish(self, part) -> None:
        self.spent += self.todo.pop(part)
        self.done += 1

    def drop(self, part) -> None:
        self.todo.pop(part, None)

    def left(self, elapsed: float) -> float | None:
        """Seconds left once the finished parts took ``elapsed`` seconds (None before any finished)."""
        if self.spent <= 0:
            return None
        return elapsed * sum(self.todo.values()) / self.spent

    def status(self) -> str:
        """', 3.0 min so far, about 5.2 min left' to append to a part's line ('' before a part finished)."""
        elapsed = time.perf_counter() - self.start
        left = self.left(elapsed)
        if left is None:
            return ""
        return f" ({elapsed / 60:.1f} min so far, about {left / 60:.1f} min left)"
