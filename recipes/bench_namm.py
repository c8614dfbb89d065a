"""NAMM overhead: tokens/s of ``namm`` against ``window`` (and ``h2o``) at the same budget.

Streams random tokens through a small model (default 2 layers, d=128, 4 heads) with
``model.stream(...)``, batch 1, no gradients, once per policy, with the same backbone weights:

* ``window``: the baseline (SDPA, no attention probabilities);
* ``h2o``: pays for the explicit attention probabilities only (fp32 softmax instead of SDPA);
* ``namm``: probabilities + recording the attention columns + the STFT/EMA step + the BAM scorer
  at every eviction (the untrained scorer costs exactly what an evolved one does);
* ``namm-evolved``: a random nonzero scorer, so that tokens really go below the budget.

Then ``--decode`` tokens one at a time (the generate loop), where every call copies the state
(state in, state out): NAMM's column buffer makes that copy larger.

For the NAMM policies the time inside the policy is split by method (``observe``: recording columns;
``before_eviction``: STFT/EMA/moments; ``score``: features + BAM). Results go to JSON::

    nice -n 10 python recipes/bench_namm.py --tokens 32768     # -> docs/results/bench/bench_namm.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import memzoo
from memzoo.bench import machine_info
from memzoo.memories.namm import namm_parameter_count, set_namm_parameters


def timed_policy_methods(model, totals: dict) -> None:
    """Wrap each layer's policy methods (on the instances) to accumulate their wall time in ``totals``."""
    for blk in model.blocks:
        policy = blk.mixer.policy
        for name in ("observe", "before_eviction", "score"):
            method = getattr(policy, name)

            def wrapped(*args, _method=method, _name=name, **kwargs):
                t0 = time.perf_counter()
                out = _method(*args, **kwargs)
                totals[_name] += time.perf_counter() - t0
                return out

            setattr(policy, name, wrapped)


def bench(name: str, args, ids: torch.Tensor) -> dict:
    design = name.removesuffix("-evolved")
    torch.manual_seed(0)  # the same backbone weights for every policy
    model = memzoo.build(
        design, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, budget=args.budget, evict_every=args.evict_every
    ).eval()
    if name == "namm-evolved":
        set_namm_parameters(model, torch.randn(namm_parameter_count(), generator=torch.Generator().manual_seed(0)) * 0.5)
    model.stream(ids[:, : 2 * args.evict_every], segment_len=args.segment_len)  # warm-up (allocator, MKL)
    totals: dict[str, float] = defaultdict(float)
    if design == "namm":
        timed_policy_methods(model, totals)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = model.stream(ids, segment_len=args.segment_len)
        times.append(time.perf_counter() - t0)
    best = min(times)
    kept = [int(layer.valid.sum()) for layer in out.state.layers]
    state, t0 = out.state, time.perf_counter()
    with torch.no_grad():
        for i in range(args.decode):  # token-by-token decoding after the stream (the generate loop)
            state = model(ids[:, i : i + 1], state=state).state
    decode_s = time.perf_counter() - t0
    result = {
        "policy": name,
        "seconds": round(best, 3),
        "tokens_per_s": round(ids.shape[1] / best),
        "decode_tokens_per_s": round(args.decode / decode_s, 1) if args.decode else None,
        "state_mib": round(out.state.nbytes() / 2**20, 2),
        "kept_tokens_per_layer_all_heads": kept,
    }
    if totals:
        result["policy_seconds"] = {k: round(v / args.repeats, 3) for k, v in totals.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768, help="streamed tokens (batch 1)")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--evict-every", type=int, default=512)
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--policies", nargs="+", default=["window", "h2o", "namm", "namm-evolved"])
    parser.add_argument("--decode", type=int, default=64, help="then decode this many tokens one at a time")
    parser.add_argument("--repeats", type=int, default=1, help="streams per policy (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench/bench_namm.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ids = torch.randint(3, 259, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.device(args.device):
        results = [bench(name, args, ids) for name in args.policies]
    base = next((r["tokens_per_s"] for r in results if r["policy"] == "window"), None)
    for r in results:
        if base:
            r["slowdown_vs_window"] = round(base / r["tokens_per_s"], 2)
        print(json.dumps(r))
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": machine_info() | {"device": args.device},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
