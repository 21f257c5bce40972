"""The docs stay usable: a short README, links that resolve, and only commands and options the CLI has.

Nothing here runs a documented command (``tools/check_docs.py`` does that); these checks are static
and fast. The CLI is introspected through ``pase.cli.app`` (the typer app), never a list kept here.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 12 * 1024

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SHELL_BREAKS = {"&&", "||", "|", ";", ">", ">>", "<", "2>", "2>&1", "&"}


@functools.cache
def _check_docs():
    """tools/check_docs.py, loaded from this checkout (its parser is what the docs check runs)."""
    spec = importlib.util.spec_from_file_location("_pase_check_docs", ROOT / "tools" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@functools.cache
def _cli() -> dict[tuple[str, ...], set[str]]:
    """Every command path (``("plan",)``, ``("hw", "show")``, and groups) -> the options it accepts."""
    import pase.cli

    root = typer.main.get_command(pase.cli.app)
    commands: dict[tuple[str, ...], set[str]] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        options = {"--help"}
        for param in command.params:
            options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
        commands[path] = options
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return commands


def _pages() -> list[Path]:
    return [README, *DOCS]


def _code_snippets(page: Path) -> list[tuple[int, str]]:
    """(line, shell text) of every bash command and every inline code span of ``page``."""
    check_docs = _check_docs()
    snippets = [(c.line, check_docs.strip_comment(c.text)) for c in check_docs.extract(page, ROOT)
                if c.kind == "bash"]
    in_fence = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        if not in_fence:
            snippets.extend((number, span) for span in INLINE_CODE.findall(line))
    return snippets


def _pase_invocations(text: str) -> list[list[str]]:
    """The argument lists after each ``pase`` (``pase``, ``.venv/bin/pase``, ``-m pase``) in ``text``."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: nothing to check
        return []
    found = []
    for i, token in enumerate(tokens):
        if token == "pase" or token.endswith("/bin/pase"):
            args = []
            for arg in tokens[i + 1:]:
                if arg in SHELL_BREAKS or arg.startswith(("|", ">", ";")):
                    break
                args.append(arg)
            found.append(args)
    return found


def _resolve(commands: dict[tuple[str, ...], set[str]], args: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The command path ``args`` names and the options it passes."""
    path: tuple[str, ...] = ()
    rest = list(args)
    while rest and not rest[0].startswith("-") and (*path, rest[0]) in commands:
        path = (*path, rest.pop(0))
    is_group = any(len(other) > len(path) and other[:len(path)] == path for other in commands)
    if rest and is_group and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        path = (*path, rest[0])  # an unknown (sub)command word: reported by the caller
    options = [arg.split("=", 1)[0] for arg in rest if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", arg)]
    return path, options


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it <= {README_LIMIT} and move detail to docs/"


def test_links_resolve() -> None:
    broken = []
    for page in _pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # URLs and anchors within the page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in LINK.findall(text)}
    assert DOCS, "docs/ has no pages"
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_and_options_exist(page: Path) -> None:
    commands = _cli()
    wrong = []
    for line, snippet in _code_snippets(page):
        for args in _pase_invocations(snippet):
            path, options = _resolve(commands, args)
            if path not in commands:
                wrong.append(f"line {line}: `pase {' '.join(path)}` is not a command ({snippet})")
                continue
            unknown = [o for o in options if o not in commands[path]]
            if unknown:
                wrong.append(f"line {line}: `pase {' '.join(path)}` has no option {', '.join(unknown)} ({snippet})")
    assert not wrong, f"{page.relative_to(ROOT)}:\n" + "\n".join(wrong)


def test_the_cli_is_introspected() -> None:
    """A guard for the check above: the typer app has the commands the docs lean on."""
    commands = _cli()
    assert ("plan",) in commands and "--cluster" in commands[("plan",)]
    assert ("hw", "show") in commands


def test_directives_are_known() -> None:
    """A misspelt check_docs directive would silently run (or not skip) a block."""
    for page in _pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if "check_docs" in line and line.lstrip().startswith("<!--"):
                assert _check_docs().DIRECTIVE.match(line), f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
