"""mkdocs hook: fill the "API reference" nav section with the pages docs/gen_pages.py wrote.

gen_pages.py writes one page per public module that imports (docs/api/<module>.md), so the list
changes as designs land; mkdocs.yml names only the section's index, and this hook adds the rest,
grouped by package.
"""

from __future__ import annotations

from pathlib import Path

SECTION = "API reference"


def _group(mod: str, modules: list[str]) -> str:
    parts = mod.split(".")
    is_package = any(m.startswith(mod + ".") for m in modules)
    if len(parts) == 1 or (len(parts) == 2 and not is_package):
        return "memzoo"
    return ".".join(parts[:2])


def on_config(config, **kwargs):
    api = Path(config["docs_dir"]) / "api"
    modules = sorted(p.stem for p in api.glob("*.md") if p.stem != "index")
    if not modules:
        return config
    modules = ["memzoo", *[m for m in modules if m != "memzoo"]] if "memzoo" in modules else modules
    groups: dict[str, list] = {}
    for mod in modules:
        groups.setdefault(_group(mod, modules), []).append({mod: f"api/{mod}.md"})
    entries: list = ["api/index.md"]
    for group, pages in groups.items():
        entries += pages if group == "memzoo" else [{group: pages}]
    for i, item in enumerate(config["nav"] or []):
        if isinstance(item, dict) and SECTION in item:
            config["nav"][i] = {SECTION: entries}
    return config
