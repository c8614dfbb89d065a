"""Whole-job estimates: bench speeds interpolated by length, parts weighed by their cost."""

import json

import pytest

from memzoo.progress import JobClock, stream_cost, stream_speed


@pytest.fixture
def bench(tmp_path):
    rows = [
        {"design": "quadratic", "tokens": 1000, "dtype": "fp32", "tokens_per_s": 4000.0},
        {"design": "quadratic", "tokens": 4000, "dtype": "fp32", "tokens_per_s": 1000.0},
        {"design": "quadratic", "tokens": 4000, "dtype": "bf16", "tokens_per_s": 9e9},  # other dtypes are ignored
        {"design": "steady", "tokens": 1000, "dtype": "fp32", "tokens_per_s": 100.0},
        {"design": "steady", "tokens": 4000, "dtype": "fp32", "tokens_per_s": 200.0},
        {"design": "broken", "tokens": 1000, "dtype": "fp32", "error": "OOM"},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"stream": rows}))
    return path


def test_speeds_are_the_benchs_rows_interpolated_in_log_log(bench):
    assert stream_speed("quadratic", 4000, bench=bench) == 1000.0
    assert stream_speed("quadratic", 2000, bench=bench) == pytest.approx(2000.0)  # 1/n between 1K and 4K
    assert stream_speed("quadratic", 500, bench=bench) == 4000.0  # below the shortest: the shortest's
    assert stream_speed("steady", 2000, bench=bench) == pytest.approx(100 * 2**0.5)
    assert stream_speed("missing", 1000, bench=bench) is None
    assert stream_speed("broken", 1000, bench=bench) is None


def test_past_the_longest_row_speed_never_rises_and_falls_at_most_as_one_over_length(bench):
    assert stream_speed("steady", 16000, bench=bench) == 200.0  # rising between its rows: flat past them
    assert stream_speed("quadratic", 16000, bench=bench) == pytest.approx(250.0)  # slope -1 kept
    assert stream_speed("quadratic", 4000, bench=bench / "missing.json") is None  # no bench file: no speeds


def test_an_unknown_design_costs_its_tokens_at_the_median_speed(bench):
    assert stream_cost("quadratic", [1000, 4000], bench=bench) == pytest.approx(1000 / 4000 + 4000 / 1000)
    median = sorted([4000.0, 1000.0, 100.0, 200.0])[2]
    assert stream_cost("missing", [4000], bench=bench) == pytest.approx(4000 / median)


def test_the_time_left_is_the_remaining_cost_at_the_finished_parts_speed():
    clock = JobClock({"cheap": 1.0, "dear": 3.0, "skipped": 5.0})
    assert clock.left(elapsed=10.0) is None and clock.status() == ""  # nothing finished: no estimate
    clock.finish("cheap")
    assert clock.left(elapsed=10.0) == pytest.approx(10.0 * 8.0)  # 10 s bought 1 unit; 8 units left
    clock.drop("skipped")
    assert clock.left(elapsed=10.0) == pytest.approx(30.0) and clock.done == 1
    clock.finish("dear")
    assert clock.left(elapsed=40.0) == 0.0 and clock.done == 2
    assert "min so far, about 0.0 min left" in clock.status()
    with pytest.raises(ValueError, match="costs must be >= 0"):
        JobClock({"a": -1.0})
