"""Generation speed of ``memzoo.hf.EvictingCache`` beside kvpress's matching presses, on one model and its weights.

The two share no transformers version (kvpress pins transformers < 5.3, memzoo needs >= 5.13), so each
side runs in its own environment and this script is run once per side. The first run writes the model
(a small random Llama, saved with ``save_pretrained``) that every later run loads, so both sides use the
same weights. A 4K-token prompt, a budget of 1,024 tokens, greedy decoding of ``--new-tokens``, batch 1,
one thread, the fastest of 3 runs; tokens/s counts the new tokens over the whole ``generate`` call (prefill included), and the
prefill alone is timed too. Pairs: ``l2`` / ``KnormPress``, ``window`` / ``StreamingLLMPress`` (its 4
sinks; memzoo's ``window`` has none), ``h2o`` / ``ObservedAttentionPress``. Each side uses the attention
its method needs: SDPA, except memzoo inside ``memzoo.hf.attention_probs`` where the cache asks for it
(``l2``, ``h2o``) and kvpress's observed-attention press on ``eager``::

    bash recipes/bench_hf_generate.sh     # both sides, then the ratios -> runs/bench-hf/summary.json

kvpress compresses the prompt once, at prefill; memzoo's cache also evicts every ``evict_every`` tokens
while decoding. Machine flags go into every JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

PAIRS = {"l2": "KnormPress", "window": "StreamingLLMPress", "h2o": "ObservedAttentionPress"}
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=16384)  # fmt: skip


def machine() -> dict:
    # memzoo.bench.machine_info's fields; memzoo is not importable on the kvpress side
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}  # fmt: skip


def load_model(folder: Path, attention: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()


def timed(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs (the least disturbed by the machine's other work), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["memzoo", "kvpress", "summary"], help="summary: the ratios of the two sides' JSON")
    ap.add_argument("--model", type=Path, default=Path("runs/bench-hf/model"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-hf"))
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--policies", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = ap.parse_args()
    if args.side == "summary":
        return summarise(args.out)
    torch.set_num_threads(1)
    ids = torch.randint(3, MODEL["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for policy in args.policies:
        if args.side == "memzoo":
            import memzoo.hf as mh

            model = load_model(args.model)

            def make(n_new: int, policy=policy, model=model):
                cache = mh.EvictingCache(policy, budget=args.budget)
                with mh.attention_probs(model) if cache.needs_attention_probs else contextlib.nullcontext():
                    model.generate(ids, **mh.generate_cache_kwargs(cache), **(gen | {"max_new_tokens": n_new, "min_new_tokens": n_new}))

            name = policy
        else:
            import kvpress

            ratio = 1 - args.budget / args.prompt
            press = getattr(kvpress, PAIRS[policy])(compression_ratio=ratio, **({"n_sink": 4} if policy == "window" else {}))
            model = load_model(args.model, "eager" if policy == "h2o" else "sdpa")  # observed attention needs eager's weights

            def make(n_new: int, press=press, model=model):
                with press(model):
                    model.generate(ids, **(gen | {"max_new_tokens": n_new, "min_new_tokens": n_new}))

            name = PAIRS[policy]
        with torch.no_grad():
            make(2)  # warm-up
            prefill = timed(lambda: make(1))
            total = timed(lambda: make(args.new_tokens))
        row = {"side": args.side, "policy": policy, "impl": name, "prompt": args.prompt, "budget": args.budget,
               "new_tokens": args.new_tokens, "seconds": round(total, 3), "prefill_seconds": round(prefill, 3),
               "tokens_per_s": round(args.new_tokens / total, 2),
               "decode_tokens_per_s": round((args.new_tokens - 1) / max(total - prefill, 1e-9), 2)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{args.side}.json"
    out.write_text(json.dumps({"machine": machine(), "model": MODEL, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def summarise(folder: Path) -> None:
    """memzoo's tokens/s over kvpress's for each pair, from the two sides' JSON, to ``summary.json``."""
    sides = {}
    for side in ("memzoo", "kvpress"):
        path = folder / f"{side}.json"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python recipes/bench_hf_generate.py {side}` in its environment first")
        sides[side] = json.loads(path.read_text())
    by = {side: {r["policy"]: r for r in d["rows"]} for side, d in sides.items()}
    pairs = []
    for policy in by["memzoo"].keys() & by["kvpress"].keys():
        m, k = by["memzoo"][policy], by["kvpress"][policy]
        pairs.append({"memzoo": policy, "kvpress": k["impl"],
                      "memzoo_tokens_per_s": m["tokens_per_s"], "kvpress_tokens_per_s": k["tokens_per_s"],
                      "ratio": round(m["tokens_per_s"] / k["tokens_per_s"], 3),
                      "decode_ratio": round(m["decode_tokens_per_s"] / k["decode_tokens_per_s"], 3)})  # fmt: skip
        print(f"{policy:>7} {m['tokens_per_s']:8.2f} tok/s  vs {k['impl']:>22} {k['tokens_per_s']:8.2f}: {pairs[-1]['ratio']:.2f}x")
    summary = {"machines": {side: d["machine"] for side, d in sides.items()}, "pairs": sorted(pairs, key=lambda r: r["memzoo"])}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {folder / 'summary.json'}")


if __name__ == "__main__":
    main()
