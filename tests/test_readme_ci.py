"""The README's commands, its example and ``.ci/run`` stay in step.

The README gives exactly two shell commands for a fresh machine, the main job and the
tests, each one line in its own fenced block. CI (``.ci/run``) must run the same test
command, and the README's ``>>>`` example must run as printed.
"""

from __future__ import annotations

import doctest
import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"

MAIN_JOB = 'python3 -m venv .venv && . .venv/bin/activate && pip install ".[cli]" && jax-rnn demo'
TESTS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install ".[test]" && python -m pytest -q'
)
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}

_FENCE = re.compile(
    r"^(?P<fence>```+)(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL
)
_PIP_EXTRAS = re.compile(r'^pip install "\.\[(?P<extras>[\w,-]+)\]"$')


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order."""
    return [(m["lang"].strip().lower(), m["body"]) for m in _FENCE.finditer(text)]


def _readme_commands() -> list[str]:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"))
    untagged = [body for lang, body in blocks if not lang]
    assert not untagged, f"README.md: fenced blocks without a language: {untagged}"
    commands = []
    for lang, body in blocks:
        if lang in SHELL_LANGUAGES:
            lines = [line for line in body.splitlines() if line.strip()]
            assert len(lines) == 1, f"README.md: a shell block must be one line, got {lines}"
            commands.append(lines[0].strip())
    return commands


def _parts(command: str) -> list[str]:
    return [part.strip() for part in command.split("&&")]


def _extras(install: str) -> set[str]:
    match = _PIP_EXTRAS.match(install)
    assert match, f'expected `pip install ".[extra,...]"`, got `{install}`'
    return set(match["extras"].split(","))


def _ci_lines() -> list[str]:
    """.ci/run's lines without comments."""
    lines = CI_SCRIPT.read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() if not line.startswith("#!") else "" for line in lines]


def _runs_in_ci(command: str) -> bool:
    pattern = re.compile(rf"(^|[\s;&|(]){re.escape(command)}($|[\s;&|)])")
    return any(pattern.search(line) for line in _ci_lines())


def test_readme_has_exactly_the_two_fresh_machine_commands():
    assert _readme_commands() == [MAIN_JOB, TESTS]


def test_readme_commands_set_up_a_fresh_venv_then_run_one_thing():
    extras_defined = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"
    ]["optional-dependencies"]
    for command in _readme_commands():
        parts = _parts(command)
        assert len(parts) == 4, f"expected venv && activate && install && run: `{command}`"
        assert parts[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], command
        unknown = _extras(parts[2]) - set(extras_defined)
        assert not unknown, f"`{command}` installs extras {unknown} that pyproject lacks"


def test_main_job_runs_the_demo_command_that_pyproject_installs():
    main_job = _parts(MAIN_JOB)
    assert "jax-rnn demo" in main_job[3]
    assert "cli" in _extras(main_job[2])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert scripts.get("jax-rnn") == "jax_rnn._cli:main"


def test_ci_runs_the_readme_test_command():
    test_run = _parts(TESTS)[3]
    assert test_run == "python -m pytest -q"
    assert _runs_in_ci(test_run), f".ci/run does not run the README's `{test_run}`"
    assert _runs_in_ci("jax-rnn demo"), ".ci/run does not run the README's `jax-rnn demo`"


def test_ci_installs_what_the_readme_test_command_installs():
    installs = [
        match["extras"]
        for line in _ci_lines()
        for match in [re.search(r'pip install (?:--?[\w-]+ )*"\.\[(?P<extras>[\w,-]+)\]"', line)]
        if match
    ]
    assert len(installs) == 1, f".ci/run should pip install the package once, got {installs}"
    ci_extras = set(installs[0].split(","))
    assert _extras(_parts(TESTS)[2]) <= ci_extras
    assert "docs" in ci_extras  # for the strict mkdocs build


def test_ci_script_is_strict_bash_and_executable():
    text = CI_SCRIPT.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in _ci_lines()
    assert os.access(CI_SCRIPT, os.X_OK), ".ci/run must be executable (chmod +x .ci/run)"
    for step in ("python3 -m venv", "ruff check .", "mkdocs build --strict"):
        assert _runs_in_ci(step), f".ci/run does not run `{step}`"


def test_readme_example_runs_as_printed():
    text = README.read_text(encoding="utf-8")
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, "README.md", str(README), 0)
    assert test.examples, "README.md has no >>> example"
    report: list[str] = []
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
