"""memzoo bench: the quick path end to end at a tiny size, the shipped config, the derived numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memzoo.bench import format_table, load_config, parse_length, peak_rss_mib, run_bench, summarize

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "bench" / "default.yaml"


def test_shipped_config_loads_full_and_quick():
    import memzoo

    for quick in (False, True):
        cfg = load_config(CONFIG, quick=quick)
        assert set(cfg["designs"]) <= set(memzoo.available())
        assert all(parse_length(n) > 0 for n in cfg["stream"]["lengths"])
    full, quick = load_config(CONFIG), load_config(CONFIG, quick=True)
    assert [parse_length(n) for n in full["stream"]["lengths"]] == [4096, 16384, 65536, 262144, 1048576]
    assert quick["model"]["d_model"] < full["model"]["d_model"] and "quick" not in full


def test_unknown_section_says_what_is_valid(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("designs: [full]\nstreams: {}\n")
    with pytest.raises(ValueError, match="valid"):
        load_config(bad)


def test_quick_bench_tiny(tmp_path, capsys):
    """peak, forward, train and one streamed length in a fresh subprocess: JSON, figures, table (< 30 s)."""
    cfg = load_config(CONFIG, quick=True) | {
        "designs": ["window"],
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "budget": 32, "evict_every": 16},
        "peak": {"n": 64, "repeats": 1},
        "forward": {"tokens": 64},
        "train": {"tokens": 64, "segment_len": 32},
        "stream": {"segment_len": 32, "lengths": [96]},
        "bf16": {"tokens": 16, "designs": ["window"]},
    }
    ballast = bytearray(300 * 2**20)  # this process's peak now exceeds a bare child's by far
    ballast[::4096] = b"x" * len(ballast[::4096])
    data = run_bench(cfg, tmp_path, sections=["peak", "forward", "train", "bf16", "stream"])
    said = capsys.readouterr().out
    assert "stream: 1 streams to measure" in said and "stream: 1/1 streams done (" in said  # the whole job's clock
    saved = json.loads((tmp_path / "bench.json").read_text())
    (stream,) = saved["stream"]
    assert "error" not in stream, stream
    assert stream["tokens"] == 96 and stream["finite"] and stream["state_nbytes"] > 0
    # the child's own peak (VmHWM), not the parent's ru_maxrss, which a child inherits on Linux
    assert 0 < stream["rss_after_build_mib"] <= stream["peak_rss_mib"] < peak_rss_mib() - 150
    assert saved["forward"][0]["flops_per_token"] > 0 and 0 < saved["forward"][0]["peak_fraction"]
    assert saved["train"][0]["tokens_per_s"] > 0
    assert {r["dtype"] for r in saved["bf16"]} == {"fp32", "bf16"}
    assert saved["peak"]["float32"]["flops_per_s"] > 0 and saved["machine"]["threads"] == 1
    assert (tmp_path / "stream_tokens_per_s.png").is_file() and (tmp_path / "stream_memory.png").is_file()
    assert "| window |" in format_table(data)
    # resumable: a second run measures nothing new and keeps the rows
    again = run_bench(cfg, tmp_path, sections=["stream"])
    assert again["stream"] == saved["stream"]


def test_summary_ratios_and_rss_growth():
    data = {
        "peers": [
            {
                "impl": "memzoo-titans",
                "stream_tokens_per_s": 300.0,
                "train_tokens_per_s": 100.0,
                "peak_rss_mib": 400,
                "rss_after_build_mib": 350,
            },
            {
                "impl": "titans-pytorch",
                "stream_tokens_per_s": 100.0,
                "train_tokens_per_s": 50.0,
                "peak_rss_mib": 800,
                "rss_after_build_mib": 300,
            },
        ],
        "stream": [
            {"design": "window", "tokens": 16384, "dtype": "fp32", "peak_rss_mib": 400.0},
            {"design": "window", "tokens": 1048576, "dtype": "fp32", "peak_rss_mib": 420.0},
            {"design": "full", "tokens": 16384, "dtype": "fp32", "peak_rss_mib": 400.0},
            {"design": "full", "tokens": 65536, "dtype": "fp32", "peak_rss_mib": 600.0},
        ],
    }
    s = summarize(data)
    assert s["peer_ratios"]["titans"]["stream_tokens_per_s"] == 3.0 and s["peer_ratios"]["titans"]["peak_rss_mib"] == 0.5
    assert s["rss_growth"]["window"]["within_10pct"] and not s["rss_growth"]["full"]["within_10pct"]


def test_progress_lines_say_the_minutes_since_the_bench_started(capsys, monkeypatch):
    import memzoo.bench

    monkeypatch.setattr(memzoo.bench, "_START", memzoo.bench.time.perf_counter() - 90.0)
    memzoo.bench._say("stream   window 1048576: starting")
    assert capsys.readouterr().out.startswith("[  1.5 min] stream   window")
