"""bf16 autocast against fp32 on shipped checkpoints: how far the logits move, whether the passkey probe
changes, and what it saves in time, on this machine.

    OMP_NUM_THREADS=1 python recipes/bf16_check.py --out docs/results/bench/bf16-check.json

For each checkpoint: the logits of one passkey prompt streamed in fp32 and under bf16 autocast (memory
maths stays fp32 inside the designs): max |difference|, mean KL(fp32 || bf16) per token, share of tokens
whose argmax agrees; the teacher-forced passkey probe (answer cross-entropy at depths < 1) both ways; and
the seconds of one training step (forward and backward of 2 x 1,024 tokens) both ways. The CPU's flags
are recorded: bf16 is only fast where it is native (``memzoo.bench.native_bf16``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch
import torch.nn.functional as F

import memzoo
from memzoo.bench import cpu_flags, native_bf16
from memzoo.io import write_text_atomic
from memzoo.tasks.passkey import make_training_batch
from memzoo.tasks.passkey_eval import probe_passkey


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, bf16: bool, segment_len: int) -> torch.Tensor:
    with autocast(bf16):
        state = model.stream(ids[:, :-segment_len], segment_len, state=None).state if ids.shape[1] > segment_len else None
        return model(ids[:, -segment_len:], state=state).logits.float()  # [1, segment_len, vocab]: the last call's


def step_seconds(model, bf16: bool, repeats: int) -> float:
    batch = make_training_batch(2, 1024, memzoo.tokenizer(), 0)
    ids, labels = batch["input_ids"], batch["labels"]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast(bf16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def check(path: str, length: int, segment_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = memzoo.load(path).eval()
    ids = make_training_batch(1, length, memzoo.tokenizer(), 1, depth=0.3)["input_ids"]
    ref, low = logits_of(model, ids, False, segment_len), logits_of(model, ids, True, segment_len)
    kl = F.kl_div(low.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)  # [1, n]
    probes = {}
    for name, on in (("fp32", False), ("bf16", True)):
        with autocast(on):
            cells = probe_passkey(model, lengths=[1024, 4096], depths=[0.0, 0.5], n_rows=4, progress=False)["cells"]
        probes[name] = {c["length"]: round(sum(x["answer_ce"] for x in cells if x["length"] == c["length"]) / 2, 4) for c in cells}
    model.train()
    fp32_s, bf16_s = step_seconds(model, False, repeats), step_seconds(model, True, repeats)
    return {
        "checkpoint": path,
        "design": model.config.memory,
        "prompt_tokens": length,
        "logits_max_abs_diff": round(float((ref - low).abs().max()), 4),
        "logits_scale": round(float(ref.abs().max()), 2),
        "mean_kl_per_token": float(kl.mean()),
        "argmax_agreement": round(float((ref.argmax(-1) == low.argmax(-1)).float().mean()), 4),
        "probe_answer_ce_depths_lt1": probes,  # {"fp32": {length: nats per digit}, "bf16": {...}}
        "train_step_s": {"fp32": round(fp32_s, 3), "bf16": round(bf16_s, 3)},
        "bf16_speedup": round(fp32_s / bf16_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=["checkpoints/passkey-full", "checkpoints/passkey-infini-deltanet",
                                                             "checkpoints/passkey-titans-mag"])  # fmt: skip
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens for the logits comparison")
    parser.add_argument("--segment-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per dtype (the fastest is kept)")
    parser.add_argument("--out", default="runs/bf16-check.json")
    args = parser.parse_args()
    rows = []
    for path in args.checkpoints:
        rows.append(check(path, args.length, args.segment_len, args.repeats))
        r = rows[-1]
        print(f"{r['design']:16s} max|dlogit| {r['logits_max_abs_diff']:.3f} (of {r['logits_scale']:.1f})  "
              f"KL {r['mean_kl_per_token']:.2e}  argmax {r['argmax_agreement']:.3f}  probe {r['probe_answer_ce_depths_lt1']}  "
              f"step x{r['bf16_speedup']:.2f}", flush=True)
    out = {"command": shlex.join(["python", "recipes/bf16_check.py", *sys.argv[1:]]), "cpu_flags": cpu_flags(),
           "native_bf16": native_bf16(), "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    write_text_atomic(args.out, json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
