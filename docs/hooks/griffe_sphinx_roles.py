"""Griffe extension: render Sphinx roles in memzoo's docstrings as inline code.

memzoo's docstrings are Google style (what mkdocstrings reads) but cross-reference with Sphinx
roles (``:class:`~memzoo.MemZooForCausalLM```, ``:func:`build```), which markdown would print
literally. This turns each role into a code span (``~`` keeps the last component, as Sphinx
does). Loaded by mkdocs.yml (mkdocstrings handler option ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc|const|ref):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRolesAsCode(Extension):
    """Replace ``:role:`target``` with ```target``` in every docstring."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
