"""Bring the shipped checkpoints' metadata up to what ``save_pretrained`` writes today, weights untouched.

Adds the ``auto_map`` entry and its two files (``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` without ``import memzoo`` first) and ``generation_config.json``. The
safetensors file, the card and the training record are not rewritten.

    python recipes/refresh_checkpoint_metadata.py checkpoints/passkey-*/ checkpoints/booksum-*/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import GenerationConfig

from memzoo.config import MemZooConfig
from memzoo.model import _write_auto_map


def refresh(folder: Path) -> None:
    if not (folder / "model.safetensors").exists():
        raise SystemExit(f"{folder} has no model.safetensors: not a memzoo model checkpoint")
    _write_auto_map(folder)
    GenerationConfig.from_model_config(MemZooConfig.from_pretrained(folder)).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        refresh(folder)
        print(f"{folder}: auto_map and generation_config.json written")


if __name__ == "__main__":
    main()
