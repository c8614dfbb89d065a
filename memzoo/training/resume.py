"""The one check a resumed run goes through: is it the run that was saved?

A run folder (training's ``last/``, evolution's ``state/``) stores the settings that made it. A
resumed run compares them with its own, section by section and key by key, and refuses a change
that alters what is computed (the model, the task, the optimiser, the population...), naming each
difference. Settings that only say how long to run or how often to log may change.

Example:
    >>> check_same_run({"model": {"memory": "infini"}}, {"model": {"memory": "infini-linear"}}, "runs/x/last")
    Traceback (most recent call last):
    ...
    ValueError: runs/x/last was saved by a run with other settings (model.memory: 'infini' -> 'infini-linear'); ...
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

__all__ = ["check_same_run", "flatten_settings", "truncate_log"]


def flatten_settings(settings: dict, prefix: str = "") -> dict:
    """``{"model": {"memory": "x"}}`` -> ``{"model.memory": "x"}``, values as JSON would store them."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten_settings(value, f"{name}.")
        else:
            flat[name] = json.loads(json.dumps(value))  # tuples become lists, as in the saved file
    return flat


def check_same_run(
    saved: dict, current: dict, where: str | Path, *, may_change: frozenset[str] = frozenset(), allow_changed: bool = False
) -> list[str]:
    """Refuse to resume a run saved with other settings: it would silently mix two runs.

    Args:
        saved: the settings stored with the run (nested dicts).
        current: the settings of the run that resumes it, the same shape.
        where: the saved folder, for the message.
        may_change: flattened keys (``"train.max_minutes"``) that may differ, with everything under them
            (``"train.extra"`` covers ``"train.extra.note"``).
        allow_changed: warn instead of raising (the user said ``--allow-changed``).

    Returns:
        the differences, ``"key: old -> new"`` (empty when the runs agree). A key only one side has
        counts: a setting that was added or removed changes the run too.
    """
    old, new = flatten_settings(saved), flatten_settings(current)
    under = tuple(f"{m}." for m in may_change)
    free = [k for k in old.keys() | new.keys() if k in may_change or k.startswith(under)]
    differ = sorted(k for k in (old.keys() | new.keys()) - set(free) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    changes = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differ]
    if changes and allow_changed:
        warnings.warn(f"resuming {where} with changed settings ({'; '.join(changes)}), as --allow-changed asks", stacklevel=3)
    elif changes:
        raise ValueError(
            f"{where} was saved by a run with other settings ({'; '.join(changes)}); resume with the same config, "
            "start over in a new run folder (or with --no-resume), or pass --allow-changed to continue with the change"
        )
    return changes


def truncate_log(log: str | Path, key: str, upto: int) -> None:
    """Keep the lines of a JSON-lines log whose ``key`` is at most ``upto`` (atomically).

    A run killed after logging but before saving, or started over, would otherwise log the same
    steps (or generations) twice; after this the log reads 1, 2, ... once, up to the saved state.
    """
    log = Path(log)
    if not log.is_file():
        return
    lines = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get(key, 0) <= upto]
    tmp = log.with_name(f".{log.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, log)
