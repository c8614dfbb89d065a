"""The ``memzoo`` command as a newcomer meets it: where results go, light imports, one-line errors."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import memzoo
from memzoo.cli import build_parser, main
from memzoo.io import atomic_file, write_text_atomic
from memzoo.units import format_length, parse_length

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every leaf sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*prefix, name))


def _out_default(parser: argparse.ArgumentParser):
    return next((a.default for a in parser._actions if "--out" in a.option_strings), None)


def test_no_command_writes_into_the_repositorys_results_by_default():
    commands = dict(_commands(build_parser()))
    assert len(commands) >= 15  # the walk reached the leaves
    defaults = {" ".join(words): _out_default(p) for words, p in commands.items()}
    into_docs = {c: d for c, d in defaults.items() if d and Path(d).parts[:1] == ("docs",)}
    assert not into_docs, f"these commands write into docs/ unless told otherwise: {into_docs}"
    assert defaults["passkey eval"] == "runs/passkey-eval" and defaults["booksum compare"] == "runs/booksum"


def test_bench_without_out_writes_under_runs(monkeypatch, tmp_path):
    import memzoo.bench

    seen = {}

    def run_bench(cfg, out, **kwargs):  # record where it would write; measure nothing
        seen["out"] = out
        return {}

    monkeypatch.setattr(memzoo.bench, "run_bench", run_bench)
    monkeypatch.setattr(memzoo.bench, "format_table", lambda data: "")
    monkeypatch.setattr(memzoo.bench, "summarize", lambda data: {})
    main(["bench", "--config", str(REPO / "recipes/configs/bench/default.yaml")])
    assert seen["out"] == "runs/bench"


def test_import_memzoo_and_building_the_parser_load_neither_torch_nor_transformers():
    code = "import sys, memzoo, memzoo.cli; memzoo.cli.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("order", ["memzoo first", "transformers first"])
def test_checkpoints_open_with_auto_classes_after_import_memzoo(tmp_path, order):
    """The lazy package still registers memzoo with transformers, whichever is imported first."""
    memzoo.build("window", d_model=32, n_layers=1, n_heads=2, budget=16).save_pretrained(tmp_path / "ckpt")
    imports = "import memzoo\nimport transformers" if order == "memzoo first" else "import transformers\nimport memzoo"
    load = f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    code = f"{imports}\n{load}\nprint(type(m).__name__, m.config.memory)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MemZooForCausalLM", "window"]


def test_public_names_resolve_and_unknown_ones_raise():
    assert set(memzoo.__all__) <= set(dir(memzoo))
    assert callable(memzoo.tokenizer) and memzoo.build is memzoo.registry.build
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        memzoo.nothing  # noqa: B018


def test_design_names_suggest_whatever_their_case():
    with pytest.raises(ValueError, match="did you mean 'titans-mac'"):
        memzoo.build("Titans-MAC")


def test_a_runs_save_is_refused_with_the_folder_to_pass(tmp_path, capsys):
    (tmp_path / "last" / "model").mkdir(parents=True)
    (tmp_path / "last" / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["booksum", "eval", "--checkpoint", str(tmp_path / "last")])
    assert f"pass '{tmp_path / 'last' / 'model'}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["passkey", "probe", "--checkpoint", "checkpoints/passkey-namm", "--depths", "1.5"], "in \\[0, 1\\]"),
        (["passkey", "probe", "--checkpoint", "checkpoints/passkey-namm", "--rows", "0"], "at least 1, got 0"),
        (["passkey", "eval", "--checkpoint", "checkpoints/passkey-namm", "--lengths", "4Q"], "16K or 1M"),
        (["passkey", "eval", "--checkpoint", "no/such/folder"], "not a memzoo checkpoint \\(no such folder\\)"),
        (["passkey", "eval", "--checkpoint", "checkpoints/passkey-namn"], "did you mean 'checkpoints/passkey-namm'\\?"),
        (["passkey", "train", "--config", "no-such.yaml"], "no such file"),
    ],
    ids=["depth", "rows", "length", "checkpoint", "misspelt-checkpoint", "config"],
)
def test_bad_arguments_are_refused_while_parsing(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(capsys):
    assert main(["demo", "--designs", "Titans-MAC", "--tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("memzoo demo --designs: error: unknown memory 'Titans-MAC'; did you mean 'titans-mac'?")
    assert err[1] == "(add --debug for the traceback)" and len(err) == 2
    with pytest.raises(ValueError, match="did you mean 'titans-mac'"):
        main(["demo", "--designs", "Titans-MAC", "--tokens", "8", "--debug"])


def test_lengths_round_trip_and_refuse_nonsense():
    for n in (1, 300, 4096, 16384, 1024**2, 3 * 1024**2):
        assert parse_length(format_length(n)) == n
    assert parse_length(" 1.5k ") == 1536
    for bad in ("lots", "0", "-4K"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "results" / "full.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["full.json"]  # no temporary file left


def test_an_interrupted_figure_leaves_the_previous_figure_whole(tmp_path, monkeypatch):
    from memzoo.plots import plt, save_figure

    path = tmp_path / "heatmap.png"
    save_figure(plt.subplots()[0], path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    fig = plt.subplots()[0]

    def savefig(path, **kwargs):  # a write that dies half way
        Path(path).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", savefig)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.png"]


def test_the_main_table_separates_memory_from_local_context(capsys):
    from memzoo.cli import _print_table

    def cells(far: float, near: float) -> list[dict]:
        return [{"length": n, "depth": d, "accuracy": near if d == 1 else far, "state_bytes": 2**20, "tokens_per_s": 1000}
                for n in (1024, 4096) for d in (0.0, 0.5, 1.0)]  # fmt: skip

    _print_table([{"design": "window", "cells": cells(0.0, 1.0)}, {"design": "namm", "cells": cells(0.75, 1.0)}])
    out = capsys.readouterr().out
    grid, memory = out.split("How to read it")
    assert "window         0.33   0.33" in grid  # the mean over depths hides that only depth 1 is answered
    assert "window         0.00   0.00      1.00         1.0      1,000" in memory
    assert "namm           0.75   0.75      1.00" in memory
    assert "local context, not memory" in memory
    assert "memory off" not in memory.split("accuracy at depths")[1].split("(state")[0]  # no control measured: no line
    assert "no memory-off control measured" in memory
    window, namm = (next(line for line in memory.splitlines() if line.startswith(d + " ")) for d in ("window", "namm"))
    assert window.endswith("local context only") and namm.endswith("depths < 1 answered to 4K (no control)")


def test_the_main_table_puts_each_designs_memory_off_control_below_it(capsys):
    from memzoo.cli import _print_table

    def result(design: str, far: float, near: float, **extra) -> dict:
        cells = [{"length": n, "depth": d, "accuracy": near if d == 1 else far, "state_bytes": 2**20, "tokens_per_s": 1000}
                 for n in (1024, 4096) for d in (0.0, 0.5, 1.0)]  # fmt: skip
        return {"design": design, "cells": cells, **extra}

    _print_table([result("namm", 1.0, 1.0), result("full", 0.5, 1.0), result("namm", 0.0, 1.0, memory_off=True)])
    memory = capsys.readouterr().out.split("How to read it")[1]
    lines = memory.splitlines()
    namm = next(i for i, line in enumerate(lines) if line.startswith("namm "))
    assert lines[namm + 1] == "  memory off   0.00   0.00      1.00"  # the control, right below the design
    assert "  memory off (none: it keeps every token)" in memory  # full has none, and says why
    assert sum(line.startswith("namm") for line in lines) == 1  # the control is no row of its own
    assert lines[namm].endswith("memory (beats its control to 4K)")  # 1.00 against the control's 0.00


def test_the_verdict_credits_the_memory_only_above_its_control():
    from memzoo.cli import _verdict

    def result(far: float, near: float) -> dict:
        return {"cells": [{"length": n, "depth": d, "accuracy": near if d == 1 else (far if n == 1024 else 0.0)}
                          for n in (1024, 4096) for d in (0.0, 1.0)]}  # fmt: skip

    assert _verdict(result(0.5, 1.0), result(0.45, 1.0)) == "local context only"  # within the margin of its control
    assert _verdict(result(0.5, 1.0), result(0.0, 1.0)) == "memory (beats its control to 1K)"
    assert _verdict(result(0.0, 0.0), result(0.0, 0.0)) == "nothing"


def test_a_compares_parts_are_weighed_by_what_they_stream(tmp_path):
    """An eviction cache's control streams like ``window``; ``full`` has no control (cost 0); the others
    cost their own design's bench seconds at the job's lengths."""
    from memzoo.cli import _part_cost
    from memzoo.progress import stream_cost

    def checkpoint(design: str) -> str:
        (tmp_path / design).mkdir()
        (tmp_path / design / "config.json").write_text(json.dumps({"memory": design}))
        return str(tmp_path / design)

    lengths = [4096, 65536]
    assert _part_cost(checkpoint("namm"), False, lengths) == stream_cost("namm", lengths)
    assert _part_cost(str(tmp_path / "namm"), True, lengths) == stream_cost("window", lengths)
    assert _part_cost(checkpoint("full"), True, lengths) == 0.0
    assert _part_cost(checkpoint("infini"), True, lengths) == stream_cost("infini", lengths)


def test_list_answers_from_the_catalog_without_torch():
    """`memzoo list` reads memzoo/catalog.json (no torch import, so it answers at once); the catalog
    must equal the live registry: after adding or changing a design run `python -m memzoo.registry`."""
    import json

    from memzoo.registry import CATALOG, catalog

    assert json.loads(CATALOG.read_text()) == catalog(), "memzoo/catalog.json is stale: run `python -m memzoo.registry`"
    code = "import sys; from memzoo.cli import main; main(['list']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "False"
    assert [line.split()[0] for line in out[:-1]] == list(catalog())
    live = subprocess.run([sys.executable, "-m", "memzoo.cli", "list", "--live"], capture_output=True, text=True, check=True).stdout
    assert live.splitlines() == out[:-1]


def test_the_main_table_fits_the_longest_name(capsys):
    from memzoo.cli import _print_table

    cells = [{"length": 1024, "depth": d, "accuracy": 1.0, "state_bytes": 1, "tokens_per_s": 1} for d in (0.0, 1.0)]
    _print_table([{"design": "infini-deltanet", "cells": cells}, {"design": "h2o", "cells": cells}])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("infini-deltanet", "h2o"))]
    assert len(rows) == 4 and len({line.index("1.00") for line in rows}) == 1  # every number column starts alike


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`memzoo list | head -1`: a closed pipe is no error to report (no traceback), exit 141 as a Unix tool's."""
    p = subprocess.Popen([sys.executable, "-m", "memzoo.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()  # before the command has written anything: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_a_misspelt_design_is_refused_before_torch_is_imported():
    """`memzoo demo --designs windw`: one line with the case-insensitive did-you-mean, from the catalog, no torch."""
    code = ("import sys\nfrom memzoo.cli import _check_designs\ntry:\n    _check_designs(['Windw'])\n"
            "except ValueError as e:\n    print(e)\nprint('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("unknown memory 'Windw'; did you mean 'window'?") and out[1] == "False"
