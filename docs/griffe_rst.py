"""A Griffe extension that lets mkdocstrings render jax_rnn's docstrings as intended.

The docstrings are Google style with a few reStructuredText habits (as in JAX and Optax):
an ``Example:`` section, ``:func:`x``` roles, ``:math:`x``` and ``.. math::`` blocks. Griffe's
Google parser only treats ``Examples:`` as doctest examples (``Example:`` becomes a plain
admonition, where ``>>>`` lines are read as Markdown), and knows no reStructuredText.
Before parsing, this extension rewrites each docstring of the loaded package:

- ``Example:`` section headers become ``Examples:``;
- ``:func:`x``` and the other cross-reference roles become code spans;
- ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block becomes a ``$$ ... $$`` block,
  both rendered by ``pymdownx.arithmatex`` and MathJax.

Configured in ``mkdocs.yml`` under the python handler's ``extensions``; used only by the docs
build. Excluded from pytest collection by ``docs/conftest.py`` (it imports griffe, which the
``test`` extra does not install).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(?P<indent>[ ]*)Example:[ ]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc|const|py:\w+):`~?(?P<name>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ ]*)\.\. math::[ ]*$")


def _math_blocks(text: str) -> str:
    """``.. math::`` and its indented body -> ``$$`` / body / ``$$`` at the same indent."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        content = [line.strip() for line in body if line.strip()]
        out += [indent + "$$", *(indent + line for line in content), indent + "$$", ""]
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The Markdown-friendly form of one docstring's text."""
    text = _EXAMPLE_HEADER.sub(r"\g<indent>Examples:", text)
    text = _MATH_ROLE.sub(r"$\g<tex>$", text)
    text = _ROLE.sub(r"`\g<name>`", text)
    return _math_blocks(text)


def _rewrite_tree(obj: Any, seen: set[int]) -> None:
    if obj.is_alias or id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None:
        obj.docstring.value = rewrite(obj.docstring.value)
        vars(obj.docstring).pop("parsed", None)  # drop a parse of the old text, if any
    for member in obj.members.values():
        _rewrite_tree(member, seen)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring of a loaded package with :func:`rewrite`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _rewrite_tree(pkg, set())
