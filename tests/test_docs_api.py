"""The API reference and the public names agree, and every public name is documented.

``docs/api.md`` renders each public name with a mkdocstrings block ``::: jax_rnn.<name>``.
These tests read ``jax_rnn.__all__`` when they run, so a name added to it without a block
(or a block left behind for a name that no longer exists) fails here, before the docs build.
"""

from __future__ import annotations

import collections
import inspect
import re
import types
from pathlib import Path
from typing import Any

import pytest

import jax_rnn

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"
_BLOCK = re.compile(r"^:::[ \t]+(?P<path>\S+)[ \t]*$", re.MULTILINE)


def _api_blocks() -> list[str]:
    """The dotted paths of every ``::: path`` block in docs/api.md, in page order."""
    return [m["path"] for m in _BLOCK.finditer(API_PAGE.read_text(encoding="utf-8"))]


def _resolve(path: str) -> Any:
    """``jax_rnn.a.b`` -> the object, by attribute access from the imported package."""
    head, *parts = path.split(".")
    assert head == "jax_rnn", path
    obj: Any = jax_rnn
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def _own_docstring(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself, or None where Python made one up or
    inherited one: a NamedTuple or dataclass without a docstring gets an automatic
    ``Name(field, ...)`` one, and ``inspect.getdoc`` falls back to a base class's."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
        if not doc:
            return None
        fields = getattr(obj, "_fields", None)
        if fields is not None and doc == f"{obj.__name__}({', '.join(fields)})":
            return None  # collections.namedtuple / typing.NamedTuple's automatic docstring
        if doc.startswith(f"{obj.__name__}(") and "__dataclass_fields__" in vars(obj):
            return None  # dataclasses' automatic signature docstring
        return doc
    return getattr(obj, "__doc__", None)


def _has_runtime_docstring(obj: Any) -> bool:
    """Only modules, classes and functions carry their own docstring at runtime."""
    if inspect.ismodule(obj) or inspect.isclass(obj):
        return True
    return callable(obj) and hasattr(obj, "__name__")


def test_all_lists_only_real_attributes():
    missing = [name for name in jax_rnn.__all__ if not hasattr(jax_rnn, name)]
    assert not missing, f"jax_rnn.__all__ names {missing}, which jax_rnn does not define."


def test_api_page_has_a_block_for_every_public_name():
    blocks = set(_api_blocks())
    missing = [name for name in jax_rnn.__all__ if f"jax_rnn.{name}" not in blocks]
    assert not missing, (
        "docs/api.md has no mkdocstrings block for "
        + ", ".join(f"jax_rnn.{name}" for name in missing)
        + "; add a line `::: jax_rnn.<name>` for each under the right heading."
    )


def test_api_page_blocks_name_public_objects_that_exist():
    blocks = _api_blocks()
    assert blocks, "docs/api.md has no `::: jax_rnn.<name>` blocks."
    for path in blocks:
        parts = path.split(".")
        assert parts[0] == "jax_rnn" and len(parts) > 1, (
            f"docs/api.md: `::: {path}` is not a public jax_rnn name; use `::: jax_rnn.<name>`."
        )
        assert not any(p.startswith("_") for p in parts[1:]), (
            f"docs/api.md: `::: {path}` is a private path; document the public name that "
            "jax_rnn re-exports instead."
        )
        assert parts[1] in jax_rnn.__all__, (
            f"docs/api.md: `::: {path}` documents `jax_rnn.{parts[1]}`, which is not in "
            "jax_rnn.__all__; export it there or remove the block."
        )
        try:
            _resolve(path)
        except AttributeError as error:
            raise AssertionError(f"docs/api.md: `::: {path}` does not resolve: {error}") from None


def test_api_page_documents_each_name_once():
    counts = collections.Counter(_api_blocks())
    repeated = sorted(path for path, n in counts.items() if n > 1)
    assert not repeated, f"docs/api.md documents {repeated} more than once."


def _public_objects() -> list[tuple[str, Any]]:
    """Every public name with its object: ``jax_rnn.__all__`` and, for each public
    submodule (rendered with its members by ``::: jax_rnn.<module>``), its own public names."""
    out = []
    for name in jax_rnn.__all__:
        obj = getattr(jax_rnn, name)
        out.append((f"jax_rnn.{name}", obj))
        if inspect.ismodule(obj):
            out += [(f"jax_rnn.{name}.{n}", getattr(obj, n)) for n in _public_names(obj)]
    return out


def test_every_public_name_has_a_docstring():
    undocumented = [
        path
        for path, obj in _public_objects()
        if _has_runtime_docstring(obj) and not (_own_docstring(obj) or "").strip()
    ]
    assert not undocumented, f"these public names have no docstring: {undocumented}"


def test_every_public_name_has_a_docstring_as_the_docs_see_it():
    """The check above cannot see the docstring of a module-level instance such as
    ``jax_rnn.elman`` (a ``Cell``; its runtime ``__doc__`` is the class's). Griffe, which the
    docs build uses, reads the string literal under the assignment; ask it."""
    griffe = pytest.importorskip("griffe", reason="griffe comes with the `docs` extra")
    package = griffe.load("jax_rnn", search_paths=[str(ROOT)], allow_inspection=False)
    undocumented = []
    for path, _ in _public_objects():
        obj = package[path.removeprefix("jax_rnn.")]
        docstring = obj.docstring
        if docstring is None or not docstring.value.strip():
            undocumented.append(path)
    assert not undocumented, (
        f"these public names have no docstring that mkdocstrings can render: {undocumented}; "
        "for a module-level value, put a string literal on the line after its assignment."
    )
