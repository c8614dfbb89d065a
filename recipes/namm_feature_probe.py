"""Can NAMM's features tell the needle from the filler at the eviction that would drop it?

Streams passkey prompts through the shipped backbone with a ``namm`` cache whose scorer is zero
(so the cache behaves as ``window``: the needle is evicted when it leaves the recent budget), and
at every eviction collects the features of the tokens about to leave (age in
``(budget, budget + evict_every]``) in prompts whose needle is among them. Then, per layer and
head, it fits a logistic regression (needle vs filler, class-balanced, full-batch L-BFGS) and
reports its training ROC AUC: an upper bound on how well any linear score of these features could
separate the two (1.0 = perfectly, 0.5 = not at all). With ``--key-redundancy`` the 26th feature
joins the 25 of the paper, which is the ablation:

    OMP_NUM_THREADS=1 python recipes/namm_feature_probe.py                    # the paper's 25 features
    OMP_NUM_THREADS=1 python recipes/namm_feature_probe.py --key-redundancy   # + key redundancy

Results: ``--out`` (default ``runs/namm-feature-probe.json``; the docs read
``docs/results/namm/feature_probe.json``, written with ``--out`` there), one entry per feature set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import memzoo
from memzoo.tasks.passkey import make_training_batch


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    order = torch.cat([score[label], score[~label]])
    ranks = torch.empty_like(order, dtype=torch.float64)
    sorted_vals, idx = order.sort()
    ranks[idx] = torch.arange(1, len(order) + 1, dtype=torch.float64)
    for v in sorted_vals.unique():  # average ranks over ties
        tie = order == v
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logistic_auc(x: torch.Tensor, y: torch.Tensor) -> float:
    """Training AUC of a class-balanced logistic regression on standardised features."""
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weight = torch.where(y, 0.5 / y.float().mean(), 0.5 / (1 - y.float().mean())).double()
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y.double(), reduction="none")).mean()
        loss = loss + 1e-4 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return auc((xb @ w).detach(), y)


def collect(model, args) -> list[tuple[int, int, bool, torch.Tensor]]:
    budget, every = model.config.memory_config["budget"], model.config.memory_config["evict_every"]
    records = []
    for layer, block in enumerate(model.blocks):
        policy = block.mixer.policy
        original = policy.score

        def recording(cache, _original=original, _policy=policy, _layer=layer):
            records.append((_layer, cache.position, cache.token_pos[:, :, : cache.length].clone(),
                            cache.valid[:, :, : cache.length].clone(), _policy.features(cache)))  # fmt: skip
            return _original(cache)

        policy.score = recording
    rows = []
    tok = memzoo.tokenizer()
    for i, depth in enumerate(args.depths):
        batch = make_training_batch(args.n_prompts, args.length, tok, args.seed + i, depth=depth)
        records.clear()
        with torch.no_grad():
            model.stream(batch["input_ids"][:, : args.length - 64], every)
        for layer, position, token_pos, valid, feats in records:
            age = position - token_pos
            for b, (start, end) in enumerate(batch["needle_spans"].tolist()):
                needle = (token_pos[b] >= start) & (token_pos[b] < end) & valid[b]
                leaving = valid[b] & (age[b] > budget) & (age[b] <= budget + every)
                if (needle & leaving).any():
                    for h in range(token_pos.shape[1]):
                        for j in leaving[h].nonzero()[:, 0].tolist():
                            rows.append((layer, h, bool(needle[h, j]), feats[b, h, j].double()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/passkey-full")
    parser.add_argument("--key-redundancy", action="store_true", help="add the 26th feature")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/namm-feature-probe.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = memzoo.swap_memory(memzoo.load(args.checkpoint), "namm", budget=256, evict_every=128,
                               key_redundancy=args.key_redundancy).eval()  # fmt: skip
    rows = collect(model, args)
    layers = sorted({r[0] for r in rows})
    result = {"features": "paper (25)" + (" + key redundancy (26)" if args.key_redundancy else ""), "length": args.length,
              "depths": args.depths, "n_prompts": args.n_prompts, "samples": len(rows),
              "needle_samples": sum(r[2] for r in rows), "per_head_auc": {}}  # fmt: skip
    for layer in layers:
        for h in sorted({r[1] for r in rows if r[0] == layer}):
            mine = [r for r in rows if r[0] == layer and r[1] == h]
            x, y = torch.stack([r[3] for r in mine]), torch.tensor([r[2] for r in mine])
            result["per_head_auc"][f"layer{layer}.head{h}"] = round(logistic_auc(x, y), 3)
    aucs = list(result["per_head_auc"].values())
    command = " ".join(["python recipes/namm_feature_probe.py", *sys.argv[1:]])
    result |= {"auc_min": min(aucs), "auc_max": max(aucs), "command": command}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(args.out.read_text()) if args.out.is_file() else {}
    known[result["features"]] = result
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
