"""Speed and memory measurements shared by ``memzoo bench`` and the ``recipes/bench_*.py`` scripts.

What is measured, and how:

* **streaming** (:func:`stream_one`): ``model.stream(...)`` over n random tokens, batch 1, no
  gradients, fed in chunks of at most 64K tokens with the state carried across (the token ids of a
  1M stream are never held at once, so they do not count against the design). Each (design,
  length) runs in a **fresh subprocess** (:func:`run_in_subprocess`), because the peak never goes
  down within a process: its peak RSS (``VmHWM``, see :func:`peak_rss_mib`) is the whole process (interpreter + torch + model +
  state + activations), and ``rss_after_build_mib`` (before the first token) is reported beside it
  so that the growth is visible. Current RSS is also sampled after every segment
  (``max_sampled_rss_mib``), a second opinion that does not depend on ``ru_maxrss``.
* **training** (:func:`train_one`, in the bench's own process: speed only): forward + backward over a 4K-token sequence cut into segments
  as the trainer does (full BPTT through the state, one ``backward``), no optimizer step.
* **FLOPs** (:func:`count_flops`): counted by ``torch.utils.flop_counter.FlopCounterMode`` on a
  real call, with SDPA forced to its math backend *while counting only* (the CPU flash kernel is
  invisible to the counter). Attention is therefore counted over the whole [queries x keys] block,
  causal mask not subtracted (the PaLM MFU convention). The achieved fraction is
  ``FLOPs / second / peak``, the peak being :func:`matmul_peak` measured in the same run.
* **peak**: the best of a few ``2048^3`` matmuls, in the threads the bench uses.

Everything here returns plain dicts, so that results go to JSON and the docs are drawn from it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from .progress import JobClock, stream_cost
from .units import parse_length

__all__ = [
    "peak_rss_mib",
    "current_rss_mib",
    "timed",
    "machine_info",
    "cpu_flags",
    "matmul_peak",
    "count_flops",
    "stream_one",
    "train_one",
    "forward_one",
    "run_in_subprocess",
    "parse_length",
    "load_config",
    "run_bench",
    "summarize",
    "bench_figures",
    "format_table",
]

STREAM_CHUNK = 65536  # token ids generated per model.stream call (bounds the ids' own memory)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB. Never decreases.

    ``VmHWM`` of ``/proc/self/status`` where there is one: it belongs to this process's memory
    map, new at ``exec``. ``ru_maxrss`` is the fallback, but on Linux a child started by
    ``subprocess`` inherits its parent's value (it is kept across fork and exec), so a small child
    of a big parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (``/proc/self/statm``; the peak where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after ``warmup`` untimed ones), and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _cpu_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that change speed and bf16 support (avx2, avx512*, amx*), from /proc/cpuinfo.

    This project's machines differ between sessions (AVX2 only, or AVX-512 with native bf16), so
    every timing and every trained checkpoint records them.
    """
    return sorted(f for f in _cpu_flags()[1] if f.startswith(("avx2", "avx512", "amx")))


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls run at full speed: a CUDA device, or a CPU with ``avx512_bf16`` or
    ``amx_bf16`` (elsewhere bf16 is emulated, ~95x slower than fp32 on an AVX2-only CPU)."""
    if torch.device(device).type == "cuda":
        return True
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()[1])


def machine_info() -> dict:
    """torch version, threads, CPU model and its bf16-relevant flags, core count and current load."""
    cpu, flags = _cpu_flags()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        # the machine may be shared: a 1-minute load above the core count means pessimistic timings
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def matmul_peak(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict:
    """Measured matmul FLOP/s: the best of ``repeats`` ``[n, n] @ [n, n]`` products (2 n^3 FLOPs each)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b  # warm-up (MKL/oneDNN kernels, page faults)
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": round(best, 4), "flops_per_s": 2 * n**3 / best}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` (forward, and backward if it calls it), counted on a real run.

    SDPA is forced to its math backend while counting, so that attention's matmuls are seen.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _build(design: str, model_kwargs: dict, seed: int = 0):
    import memzoo

    torch.manual_seed(seed)
    return memzoo.build(design, **model_kwargs)


def _ids(n: int, seed: int, vocab: int = 259) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def stream_one(design: str, tokens: int, *, segment_len: int, model_kwargs: dict, dtype: str = "fp32", seed: int = 0) -> dict:
    """Stream ``tokens`` random tokens through a fresh model (batch 1, no gradients); speed and memory.

    Meant to run alone in its process (see :func:`run_in_subprocess`): ``peak_rss_mib`` is the
    process's peak since it started.
    """
    model = _build(design, model_kwargs, seed).eval()
    warm = model.init_state(1)  # warm-up on a throwaway state (allocator, kernels), not timed
    with _autocast(dtype):
        model.stream(_ids(min(segment_len, tokens), seed + 1), segment_len=segment_len, state=warm)
    del warm
    rss_build = current_rss_mib()
    state, sampled, done, t0 = model.init_state(1), rss_build, 0, time.perf_counter()
    while done < tokens:
        n = min(STREAM_CHUNK, tokens - done)
        ids = _ids(n, seed + 2 + done)
        for start in range(0, n, segment_len):  # a segment at a time, to sample the RSS between calls
            with _autocast(dtype):
                out = model.stream(ids[:, start : start + segment_len], segment_len=segment_len, state=state)
            state = out.state
            sampled = max(sampled, current_rss_mib())
        done += n
    seconds = time.perf_counter() - t0
    return {
        "design": design,
        "tokens": tokens,
        "dtype": dtype,
        "segment_len": segment_len,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_after_build_mib": round(rss_build, 1),
        "max_sampled_rss_mib": round(sampled, 1),
        "state_nbytes": state.nbytes(),
        "finite": bool(torch.isfinite(out.logits).all()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def forward_one(design: str, tokens: int, *, model_kwargs: dict, peak_flops_per_s: float | None = None,
                dtype: str = "fp32", repeats: int = 3, seed: int = 0) -> dict:  # fmt: skip
    """One forward call of ``tokens`` tokens from a fresh state (no gradients): tokens/s, FLOPs and the peak fraction."""
    model = _build(design, model_kwargs, seed).eval()
    ids = _ids(tokens, seed)

    def run():
        with torch.no_grad(), _autocast(dtype):
            return model(ids, state=model.init_state(1))

    flops = count_flops(run)
    seconds, _ = timed(run, repeats=repeats, warmup=1)
    row = {"design": design, "tokens": tokens, "dtype": dtype, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
           "flops_per_token": round(flops / tokens), "achieved_flops_per_s": flops / seconds}  # fmt: skip
    if peak_flops_per_s:
        row["peak_fraction"] = round(flops / seconds / peak_flops_per_s, 4)
    return row


def train_one(design: str, tokens: int, *, segment_len: int, model_kwargs: dict, peak_flops_per_s: float | None = None,
              dtype: str = "fp32", repeats: int = 2, seed: int = 0) -> dict:  # fmt: skip
    """Forward + backward over one ``tokens``-long sequence cut into ``segment_len`` calls (full BPTT), as the trainer does."""
    import torch.nn.functional as F

    model = _build(design, model_kwargs, seed).train()
    ids = _ids(tokens + 1, seed)

    def step():
        state, loss = model.init_state(1), 0.0
        for start in range(0, tokens, segment_len):
            end = min(tokens, start + segment_len)
            with _autocast(dtype):
                out = model(ids[:, start:end], state=state)
            loss = loss + F.cross_entropy(out.logits.flatten(0, 1).float(), ids[0, start + 1 : end + 1], reduction="sum")
            state = out.state
        (loss / tokens).backward()
        model.zero_grad(set_to_none=True)

    flops = count_flops(step)
    seconds, _ = timed(step, repeats=repeats, warmup=1)
    row = {"design": design, "tokens": tokens, "dtype": dtype, "segment_len": segment_len, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "flops_per_token": round(flops / tokens)}  # fmt: skip
    if peak_flops_per_s:
        row["peak_fraction"] = round(flops / seconds / peak_flops_per_s, 4)
    return row


def run_in_subprocess(args: list[str], *, python: str | None = None, threads: int = 1, timeout: float | None = None,
                      cwd: str | Path | None = None) -> dict:  # fmt: skip
    """Run ``python ARGS`` in a fresh process and parse the JSON object on its last stdout line.

    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set to ``threads``. A failure (exit status, timeout,
    no JSON) comes back as ``{"error": ...}`` instead of raising, so a long bench keeps going.
    """
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([python or sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the whole bench

REPO = Path(__file__).resolve().parents[1]
PEER_RUNNER = REPO / "recipes" / "peer_run.py"
PEER_PAIRS = {"titans": ("memzoo-titans", "titans-pytorch"), "infini": ("memzoo-infini", "infini-transformer-pytorch")}


def load_config(path: str | Path, *, quick: bool = False) -> dict:
    """Read a bench YAML (``recipes/configs/bench/default.yaml``); with ``quick``, its ``quick:`` section overrides."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bench config at {str(path)!r}; the shipped one is recipes/configs/bench/default.yaml")
    cfg = yaml.safe_load(path.read_text()) or {}
    known = {"model", "threads", "designs", "stream", "train", "forward", "bf16", "peak", "peers", "quick"}
    if set(cfg) - known:
        raise ValueError(f"{path}: unknown section(s) {sorted(set(cfg) - known)}; valid: {sorted(known)}")
    over = cfg.pop("quick", None) or {}
    if quick:
        for key, value in over.items():
            cfg[key] = cfg.get(key, {}) | value if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("design", "impl", "tokens", "dtype"))


class _Results:
    """The results JSON, rewritten after every measurement (an interrupted bench keeps what it has and resumes).

    Each write re-reads the file under a lock and merges: rows measured by another ``memzoo bench``
    writing to the same folder at the same time (e.g. the long streams in a second process) are kept.
    """

    def __init__(self, path: Path, fresh: bool):
        self.path, self.touched, self.fresh = path, set(), fresh  # fresh: measure again (and replace) what is asked
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.touched.add(key)
        self.save()

    def has(self, section: str, **key) -> dict | None:
        return next((r for r in self.data.get(section, []) if all(r.get(k) == v for k, v in key.items()) and "error" not in r), None)

    def add(self, section: str, row: dict) -> None:
        self.data[section] = [r for r in self.data.get(section, []) if _key(r) != _key(row)] + [row]
        self.touched.add(section)
        self.save(replace={section: _key(row)})

    def drop(self, section: str, row_key: tuple) -> None:
        self.data[section] = [r for r in self.data.get(section, []) if _key(r) != row_key]
        self.save(remove={section: row_key})

    def save(self, replace: dict | None = None, remove: dict | None = None) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time; merge with what the others wrote
            disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            merged = disk | {k: v for k, v in self.data.items() if k in self.touched or k not in disk}
            if isinstance(disk.get("runs"), list):  # every bench that wrote here, by command line
                known = {x["command"] for x in disk["runs"]}
                merged["runs"] = disk["runs"] + [r for r in self.data.get("runs", []) if r["command"] not in known]
            for section, rows in disk.items():
                if section != "runs" and isinstance(rows, list) and isinstance(self.data.get(section), list):
                    # the file wins, except for the row written now (another bench may have re-measured the others)
                    new = (replace or {}).get(section)
                    mine = [r for r in self.data[section] if _key(r) == new]
                    kept = [r for r in rows if _key(r) not in (new, (remove or {}).get(section))]
                    kept += [r for r in self.data[section] if _key(r) not in {_key(x) for x in rows} and _key(r) != new]
                    merged[section] = sorted(kept + mine, key=lambda r: tuple(str(x) for x in _key(r)))
            self.data = merged
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=1) + "\n")
            tmp.replace(self.path)
        finally:
            os.close(fd)


_START = time.perf_counter()


def _say(msg: str) -> None:
    """One progress line, prefixed with the minutes since the bench started."""
    print(f"[{(time.perf_counter() - _START) / 60:5.1f} min] {msg}", flush=True)


def run_bench(cfg: dict, out: str | Path, *, designs: list[str] | None = None, sections: list[str] | None = None,
              fresh: bool = False, peers_python: str | None = None, command: str = "") -> dict:  # fmt: skip
    """Run the bench described by ``cfg`` (see :func:`load_config`); results to ``OUT/bench.json`` + figures.

    Streams run in a fresh subprocess each (peak RSS); speed-only measurements in this process;
    all with ``cfg["threads"]`` torch threads.
    Measurements already in ``OUT/bench.json`` are kept and skipped; ``fresh`` measures the asked ones again (others are kept).
    """
    global _START
    _START = time.perf_counter()
    out = Path(out)
    res = _Results(out / "bench.json", fresh)
    threads, model = int(cfg.get("threads", 1)), dict(cfg.get("model", {}))
    torch.set_num_threads(threads)
    designs = designs or list(cfg["designs"])
    sections = sections or ["peak", "forward", "train", "peers", "bf16", "stream"]
    run = {"command": command, "machine": machine_info(), "designs": designs, "sections": sections}
    res.set("runs", [*[r for r in res.data.get("runs", []) if r.get("command") != command], run])
    for key, value in (("machine", run["machine"]), ("config", cfg), ("command", command)):
        if key not in res.data:  # the first run's; each run is listed in "runs"
            res.set(key, value)
    res.set(
        "method",
        {
            "peak_rss": "fresh subprocess per (design, length): VmHWM of the whole process (interpreter + torch + model + state +"
            " activations); rss_after_build_mib is its RSS before the first token;"
            " max_sampled_rss_mib samples /proc/self/statm per segment",
            "flops": "torch.utils.flop_counter on a real call, SDPA counted through its math backend (full [queries x keys] block,"
            " causal mask not subtracted: PaLM MFU convention)",
            "peak_fraction": "counted FLOPs / wall seconds / measured fp32 matmul peak (same threads)",
        },
    )
    sub = ["-m", "memzoo.bench"]
    mjson = json.dumps(model)

    if "peak" in sections:
        pk = cfg.get("peak", {})
        # bf16 at a smaller n, twice: where the CPU lacks avx512_bf16/AMX it runs at ~1 GFLOP/s (a 2048^3 product takes ~20 s)
        res.set(
            "peak",
            {
                "float32": matmul_peak(pk.get("n", 2048), torch.float32, pk.get("repeats", 5)),
                "bfloat16": matmul_peak(min(pk.get("n", 2048), 1024), torch.bfloat16, 2),
            },
        )
        _say("peak matmul: " + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for k, v in res.data["peak"].items()))
    peak = res.data.get("peak", {}).get("float32", {}).get("flops_per_s")

    def measure(section, what, design, tokens, segment_len=None, dtype="fp32"):
        done = None if res.fresh else res.has(section, design=design, tokens=tokens, dtype=dtype)
        if done:
            return done
        if what == "stream":  # a fresh process per (design, length): its ru_maxrss is this stream's peak
            args = [*sub, what, "--design", design, "--tokens", str(tokens), "--model", mjson, "--dtype", dtype, "--threads", str(threads)]
            row = run_in_subprocess([*args, "--segment-len", str(segment_len)], threads=threads, cwd=REPO)
        else:  # speed only: in this process (no interpreter start per measurement)
            fn = (
                partial(forward_one, repeats=1 if dtype == "bf16" else 3)
                if what == "forward"
                else partial(train_one, segment_len=segment_len)
            )
            try:
                row = fn(design, tokens, model_kwargs=model, peak_flops_per_s=peak, dtype=dtype)
            except Exception as e:  # noqa: BLE001  (a design that fails is reported, the bench goes on)
                row = {"error": f"{type(e).__name__}: {e}"}
        row = {"design": design, "tokens": tokens, "dtype": dtype} | row
        res.add(section, row)
        msg = row.get("error") or f"{row['tokens_per_s']:.0f} tok/s"
        if "peak_rss_mib" in row:
            msg += f", peak RSS {row['peak_rss_mib']:.0f} MiB, state {row['state_nbytes']} B"
        if "peak_fraction" in row:
            msg += f", {100 * row['peak_fraction']:.1f}% of peak"
        _say(f"{section:8s} {design:14s} {tokens:>8d} {dtype}: {msg}")
        return row

    if "forward" in sections:
        for d in designs:
            measure("forward", "forward", d, parse_length(cfg["forward"]["tokens"]))
    if "train" in sections:
        tc = cfg["train"]
        for d in designs:
            measure("train", "train", d, parse_length(tc["tokens"]), tc["segment_len"])
    if "bf16" in sections and cfg.get("bf16"):
        bc = cfg["bf16"]
        for d in [x for x in bc.get("designs", designs) if x in designs]:
            for dtype in ("fp32", "bf16"):
                measure("bf16", "forward", d, parse_length(bc["tokens"]), dtype=dtype)
    if "peers" in sections and cfg.get("peers"):
        run_peers(cfg["peers"], res, peers_python=peers_python, threads=threads)
    if "stream" in sections:
        sc = cfg["stream"]
        lengths = sorted(parse_length(x) for x in sc["lengths"])
        long_designs, short_max = set(sc.get("long_designs", designs)), parse_length(sc.get("short_max", max(lengths)))
        limits = {parse_length(k): float(v) for k, v in (sc.get("max_seconds_at") or {}).items()}
        planned = [(d, n) for d in designs for n in lengths if (n <= short_max or d in long_designs)
                   and (res.fresh or not res.has("stream", design=d, tokens=n, dtype="fp32"))]  # fmt: skip
        clock = JobClock({(d, n): stream_cost(d, [n]) for d, n in planned})  # weighed by the committed bench's speeds
        _say(f"stream: {len(planned)} streams to measure")
        for d in designs:
            prev = None
            for n in lengths:
                if n > short_max and d not in long_designs:
                    break
                estimate = n / prev["tokens_per_s"] if prev and "tokens_per_s" in prev else None
                if n in limits and estimate and estimate > limits[n] and not res.has("stream", design=d, tokens=n, dtype="fp32"):
                    note = {"design": d, "tokens": n, "estimated_seconds": round(estimate), "limit_seconds": limits[n]}
                    res.add("stream_skipped", note)
                    _say(f"stream   {d:14s} {n:>8d}: skipped (estimated {estimate:.0f} s > {limits[n]:.0f} s)")
                    break
                if estimate and (res.fresh or not res.has("stream", design=d, tokens=n, dtype="fp32")):
                    _say(f"stream   {d:14s} {n:>8d}: starting, about {estimate / 60:.1f} min at the last length's speed")
                prev = measure("stream", "stream", d, n, sc["segment_len"])
                if (d, n) in clock.todo:
                    clock.finish((d, n))
                    _say(f"stream: {clock.done}/{clock.done + len(clock.todo)} streams done{clock.status()}")
                if any(_key(r) == _key({"design": d, "tokens": n}) for r in res.data.get("stream_skipped", [])):
                    res.drop("stream_skipped", _key({"design": d, "tokens": n}))
                if "error" in prev:
                    break
            for cell in [c for c in clock.todo if c[0] == d]:  # the lengths a skip or an error left unmeasured
                clock.drop(cell)
    res.set("summary", summarize(res.data))
    bench_figures(res.data, out)
    return res.data


def run_peers(pc: dict, res: _Results, *, peers_python: str | None, threads: int) -> None:
    """memzoo vs the public implementations, each in a fresh process, same runner, same sizes."""
    python = Path(peers_python or pc.get("python", ".venv-peers/bin/python"))
    python = python if python.is_absolute() else REPO / python
    for pair, (ours, theirs) in PEER_PAIRS.items():
        opts = pc.get(pair)
        if not opts:
            continue
        args = [str(PEER_RUNNER), "--threads", str(threads)] + [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
        for impl, interp in ((ours, sys.executable), (theirs, str(python))):
            if not res.fresh and res.has("peers", impl=impl, tokens=opts.get("tokens", 2048)):
                continue
            if impl == theirs and not python.is_file():
                row = {"impl": impl, "tokens": opts.get("tokens", 2048), "error": f"no {python}: run bash recipes/setup_peers.sh"}
            else:
                row = {"impl": impl, "tokens": opts.get("tokens", 2048)} | run_in_subprocess([*args, "--impl", impl], python=interp,
                                                                                            threads=threads, cwd=REPO)  # fmt: skip
            row["pair"] = pair
            res.add("peers", row)
            _say(f"peers    {impl:28s}: " + (row.get("error") or f"stream {row['stream_tokens_per_s']:.0f} tok/s, "
                 f"train {row.get('train_tokens_per_s', 0):.0f} tok/s, peak RSS {row['peak_rss_mib']:.0f} MiB"))  # fmt: skip


def summarize(data: dict) -> dict:
    """Derived numbers: memzoo/peer ratios, RSS growth from 16K to the longest length, the targets' status."""
    summary: dict = {"peer_ratios": {}, "rss_growth": {}}
    peers = {r["impl"]: r for r in data.get("peers", []) if "error" not in r}
    for pair, (ours, theirs) in PEER_PAIRS.items():
        if ours in peers and theirs in peers:
            a, b = peers[ours], peers[theirs]
            summary["peer_ratios"][pair] = {
                k: round(a[k] / b[k], 2) for k in ("stream_tokens_per_s", "train_tokens_per_s", "peak_rss_mib") if a.get(k) and b.get(k)
            } | {"peak_rss_growth_mib": {ours: round(a["peak_rss_mib"] - a["rss_after_build_mib"], 1),
                                         theirs: round(b["peak_rss_mib"] - b["rss_after_build_mib"], 1)}}  # fmt: skip
    stream = [r for r in data.get("stream", []) if "error" not in r and r.get("dtype") == "fp32"]
    for d in sorted({r["design"] for r in stream}):
        rows = {r["tokens"]: r for r in stream if r["design"] == d}
        base, top = rows.get(16384), rows[max(rows)]
        if base and max(rows) > 16384:
            ratio = top["peak_rss_mib"] / base["peak_rss_mib"]
            summary["rss_growth"][d] = {"from": 16384, "to": max(rows), "peak_rss_ratio": round(ratio, 3), "within_10pct": ratio <= 1.1}
    fwd = {r["design"]: r.get("peak_fraction") for r in data.get("forward", []) if "error" not in r}
    summary["forward_peak_fraction"] = fwd
    return summary


def bench_figures(data: dict, out: str | Path) -> list[Path]:
    """Tokens/s and memory (peak RSS, state bytes) against context length, one line per design."""
    from .plots import format_length, plt, save_figure

    stream = [r for r in data.get("stream", []) if "error" not in r and r.get("dtype") == "fp32"]
    if not stream:
        return []
    designs = sorted({r["design"] for r in stream})
    ticks = sorted({r["tokens"] for r in stream})
    paths = []
    panels = [
        ("stream_tokens_per_s.png", [("tokens_per_s", "streaming tokens/s (batch 1, fp32)", False)]),
        ("stream_memory.png", [("peak_rss_mib", "peak RSS of the process (MiB)", False), ("state_nbytes", "state.nbytes() (bytes)", True)]),
    ]
    for name, fields in panels:
        fig, axes = plt.subplots(1, len(fields), figsize=(6.5 * len(fields), 4), squeeze=False)
        for ax, (field, label, logy) in zip(axes[0], fields):
            for i, d in enumerate(designs):  # 12 designs: tab20 and two line styles keep every line distinct
                rows = sorted((r for r in stream if r["design"] == d), key=lambda r: r["tokens"])
                style = {"color": plt.get_cmap("tab20")(i % 20), "linestyle": "-" if i % 2 == 0 else "--"}
                ax.plot([r["tokens"] for r in rows], [r[field] for r in rows], marker="o", label=d, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if logy or field == "tokens_per_s" else "linear")
            ax.set_xticks(ticks, [format_length(n) for n in ticks])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=2)
        m = data.get("machine", {})
        fig.suptitle(f"memzoo bench: {m.get('cpu', '')}, {m.get('threads', '?')} thread(s), load {m.get('loadavg_1min', '?')}", fontsize=8)
        paths.append(save_figure(fig, Path(out) / name))
    return paths


def format_table(data: dict) -> str:
    """A markdown table per design: streaming tokens/s per length, peak RSS at 16K and the longest, state bytes, train, FLOP fraction."""
    from .plots import format_length

    stream = [r for r in data.get("stream", []) if "error" not in r and r.get("dtype") == "fp32"]
    lengths = sorted({r["tokens"] for r in stream})
    train = {r["design"]: r for r in data.get("train", []) if "error" not in r}
    fwd = {r["design"]: r for r in data.get("forward", []) if "error" not in r}
    bf = {(r["design"], r["dtype"]): r for r in data.get("bf16", []) if "error" not in r}
    designs = sorted({r["design"] for r in stream} | set(train) | set(fwd))
    head = ["design", *[f"tok/s {format_length(n)}" for n in lengths], "peak RSS 16K (MiB)", "peak RSS longest (MiB)"]
    head += ["state bytes longest", "train tok/s 4K", "fwd % of fp32 peak", "bf16 / fp32 fwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in designs:
        rows = {r["tokens"]: r for r in stream if r["design"] == d}
        top = rows[max(rows)] if rows else None
        cells = [d, *[f"{rows[n]['tokens_per_s']:.0f}" if n in rows else "-" for n in lengths]]
        cells.append(f"{rows[16384]['peak_rss_mib']:.0f}" if 16384 in rows else "-")
        cells.append(f"{top['peak_rss_mib']:.0f} ({format_length(max(rows))})" if top else "-")
        cells.append(f"{top['state_nbytes']:,}" if top else "-")
        cells.append(f"{train[d]['tokens_per_s']:.0f}" if d in train else "-")
        cells.append(f"{100 * fwd[d]['peak_fraction']:.1f}" if d in fwd and "peak_fraction" in fwd[d] else "-")
        ratio = (bf[(d, "bf16")]["tokens_per_s"] / bf[(d, "fp32")]["tokens_per_s"]) if (d, "bf16") in bf and (d, "fp32") in bf else None
        cells.append(f"{ratio:.2f}" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    """``python -m memzoo.bench stream|forward|train --design D --tokens N ...``: one measurement, one JSON line."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m memzoo.bench", description=_main.__doc__)
    p.add_argument("what", choices=["stream", "forward", "train"])
    p.add_argument("--design", required=True)
    p.add_argument("--tokens", type=parse_length, required=True)
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--model", default="{}", help="memzoo.build overrides as JSON")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s for the fraction")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = json.loads(a.model)
    if a.what == "stream":
        row = stream_one(a.design, a.tokens, segment_len=a.segment_len, model_kwargs=kw, dtype=a.dtype)
    elif a.what == "forward":
        row = forward_one(a.design, a.tokens, model_kwargs=kw, peak_flops_per_s=a.peak, dtype=a.dtype)
    else:
        row = train_one(a.design, a.tokens, segment_len=a.segment_len, model_kwargs=kw, peak_flops_per_s=a.peak, dtype=a.dtype)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
