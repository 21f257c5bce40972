"""Run every command in README.md and docs/*.md once, and report which ones fail.

    python tools/check_docs.py                      # every page (about 40 min on 2 cores)
    python tools/check_docs.py --page sampling      # one page (README, cli, docs/cli.md all work)
    python tools/check_docs.py --list               # the commands, without running them
    python tools/check_docs.py --json results.json  # also write the results as JSON

What runs: each line of a fenced ```bash block (lines ending in ``\\`` continue; comment lines and
blank lines are dropped; bash itself ignores a trailing ``# comment``), and each fenced ```python
block as one script. Pages run one after another, their commands in order, each page in its own
scratch directory that mirrors the repository root: symlinks to the packages, tests, setup files
and ``.venv``, and a copy of ``tools/``. So commands are written as run from the repository root
(``.venv/bin/pase``, ``tools/bench_plan.py``, ``tests/fixtures/...`` all resolve), and whatever they
write (plan.json, runs/, bench_results/) stays in the scratch directory, which is removed afterwards
unless ``--keep``. The environment puts the virtual environment's ``bin/`` first on PATH and the
repository root first on PYTHONPATH, so ``pase``, ``torchrun`` and ``python`` are this checkout's.
The user's caches (``~/.cache/pase``: layer graphs, calibration profiles) are used as they are.

``./tools/setup.sh`` is not run when the virtual environment exists (``.venv`` at the repository
root, else ``--venv``, else the one running this script); otherwise it runs once, in the repository
root, before anything else.

Directives: an HTML comment right above a fenced block (blank lines between are allowed) changes
how the block is handled:

    <!-- check_docs: skip: needs 8 GPUs -->     reported as skipped, with the reason
    <!-- check_docs: file: lab.yaml -->         the block's text is written to that file in the
                                                 page's scratch directory (any fence language)
    <!-- check_docs: timeout: 1200 -->          seconds per command of this block (default --timeout)

Each command runs under ``bash -o pipefail -c`` with a timeout (exit 124 when it runs out). The
exit status is 1 when any command failed, 0 otherwise. Standard library only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^\s*<!--\s*check_docs:\s*(skip|file|timeout)\s*:?\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SETUP = "./tools/setup.sh"
# What the scratch directory links to (the rest of the repository is not needed to run the docs).
NOT_MIRRORED = {".git", ".venv", "tools", "bench_results", ".pytest_cache", ".ruff_cache", "build", "dist",
                "__pycache__", ".mypy_cache", ".check_docs"}


@dataclass
class Command:
    page: str  # "README.md" or "docs/cli.md"
    index: int  # 1-based, in page order
    kind: str  # "bash", "python" or "file"
    text: str  # the command, a script, or a file's contents
    line: int  # line of the page where it starts
    skip: str | None = None  # reason, when skipped
    timeout: float | None = None
    name: str | None = None  # the file written ("file") or the script's name ("python")

    @property
    def label(self) -> str:
        if self.kind == "bash":
            return " ".join(strip_comment(self.text).split())
        if self.kind == "file":
            return f"(write {self.name})"
        first = next((ln.strip() for ln in self.text.splitlines() if ln.strip() and not ln.strip().startswith("#")),
                     "")
        return f"python: {first}"


@dataclass
class Result:
    page: str
    index: int
    line: int
    kind: str
    command: str
    status: str  # "ok", "failed", "skipped", "timeout"
    exit: int | None
    seconds: float
    reason: str | None = None
    output_tail: list[str] = field(default_factory=list)


def strip_comment(command: str) -> str:
    """``command`` without a trailing ``# comment`` (a ``#`` after a blank, outside quotes), as bash reads it."""
    quote = None
    for i, char in enumerate(command):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def pages(root: Path = ROOT) -> list[Path]:
    """README.md, then docs/*.md in name order."""
    found = [root / "README.md"] if (root / "README.md").exists() else []
    return found + sorted((root / "docs").glob("*.md"))


def page_name(path: Path, root: Path = ROOT) -> str:
    return path.absolute().relative_to(root.absolute()).as_posix()


def bash_commands(block: str) -> list[tuple[int, str]]:
    """(line offset in the block, command) for each command of a bash block: continuation lines
    (ending in a backslash) are joined, comment-only and blank lines dropped."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(block.splitlines()):
        line = raw.rstrip()
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = offset
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line.strip() if pending else line.strip())
        commands.append((start, " ".join(part.strip() for part in pending if part.strip())))
        pending = []
    if pending:
        commands.append((start, " ".join(part.strip() for part in pending if part.strip())))
    return commands


def extract(path: Path, root: Path = ROOT) -> list[Command]:
    """The commands of one page, in order (see the module docstring for what counts)."""
    name = page_name(path, root)
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: list[Command] = []
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        if directive:
            directives[directive.group(1)] = directive.group(2)
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if line.strip():
                directives = {}  # a directive applies only to the block right below it
            i += 1
            continue
        marker, language = fence.group(2), fence.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(marker):
            body.append(lines[j])
            j += 1
        block = "\n".join(body) + "\n"
        skip = directives.get("skip")
        timeout = float(directives["timeout"]) if "timeout" in directives else None
        if "file" in directives:
            commands.append(Command(name, 0, "file", block, i + 1, skip, timeout, directives["file"]))
        elif language == "bash":
            for offset, text in bash_commands(block):
                commands.append(Command(name, 0, "bash", text, i + 2 + offset, skip, timeout))
        elif language == "python":
            commands.append(Command(name, 0, "python", block, i + 2, skip, timeout))
        directives = {}
        i = j + 1
    for number, command in enumerate(commands, 1):
        command.index = number
        if command.kind == "python":
            command.name = f"snippet_{number}.py"
    return commands


def find_venv(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).resolve()
    if (ROOT / ".venv" / "bin" / "python").exists():
        return ROOT / ".venv"
    if sys.prefix != sys.base_prefix:  # running inside a virtual environment: use it
        return Path(sys.prefix)
    return None


def environment(venv: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONHOME", None)
    return env


def mirror(scratch: Path, venv: Path) -> None:
    """Make ``scratch`` look like the repository root (see the module docstring)."""
    scratch.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in NOT_MIRRORED or entry.name.endswith(".egg-info"):
            continue
        (scratch / entry.name).symlink_to(entry)
    (scratch / ".venv").symlink_to(venv)
    shutil.copytree(ROOT / "tools", scratch / "tools", ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)


def run_one(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path) -> tuple[int, float, bool]:
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code, timed_out = 124, True
        else:  # children left behind by the command (e.g. a torchrun worker) go with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, time.perf_counter() - started, timed_out


def tail(log: Path, count: int = 25) -> list[str]:
    try:
        return log.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except OSError:
        return []


def run_page(commands: list[Command], scratch: Path, venv: Path, timeout: float, verbose: bool) -> list[Result]:
    mirror(scratch, venv)
    env = environment(venv)
    logs = scratch / ".check_docs"
    logs.mkdir()
    results: list[Result] = []
    for command in commands:
        label = command.label
        if command.skip is not None:
            results.append(Result(command.page, command.index, command.line, command.kind, label, "skipped", None,
                                  0.0, command.skip))
            print(f"  [{command.index:2d}] skipped ({command.skip}): {label}", flush=True)
            continue
        if command.kind == "file":
            assert command.name
            target = scratch / command.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(command.text, encoding="utf-8")
            results.append(Result(command.page, command.index, command.line, command.kind, label, "ok", 0, 0.0))
            continue
        reason = None
        text = command.text
        if command.kind == "bash" and text.startswith(SETUP):
            rest = text[len(SETUP):].strip()
            reason = "./tools/setup.sh skipped: the virtual environment exists"
            if not rest:
                results.append(Result(command.page, command.index, command.line, command.kind, label, "skipped",
                                      None, 0.0, reason))
                print(f"  [{command.index:2d}] skipped ({reason}): {label}", flush=True)
                continue
            text = re.sub(r"^(&&|;)\s*", "", rest)
        if command.kind == "python":
            assert command.name
            (scratch / command.name).write_text(command.text, encoding="utf-8")
            argv = [str(venv / "bin" / "python"), command.name]
        else:
            argv = ["bash", "-o", "pipefail", "-c", text]
        log = logs / f"{command.index:02d}.log"
        print(f"  [{command.index:2d}] {label[:110]}", flush=True)
        code, seconds, timed_out = run_one(argv, scratch, env, command.timeout or timeout, log)
        status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
        result = Result(command.page, command.index, command.line, command.kind, label, status, code,
                        round(seconds, 1), reason)
        if status != "ok":
            result.output_tail = tail(log)
        print(f"       -> {status}, exit {code}, {seconds:.1f} s", flush=True)
        if verbose or status != "ok":
            for ln in result.output_tail or tail(log):
                print(f"       | {ln}", flush=True)
        results.append(result)
    return results


def select(all_pages: list[Path], wanted: list[str]) -> list[Path]:
    if not wanted:
        return all_pages
    chosen = []
    for want in wanted:
        key = want.removesuffix(".md").removeprefix("docs/").lower()
        match = [p for p in all_pages if p.stem.lower() == key]
        if not match:
            raise SystemExit(f"no page {want!r}; pages: {', '.join(p.stem for p in all_pages)}")
        chosen.extend(m for m in match if m not in chosen)
    return chosen


def table(results: list[Result]) -> str:
    rows = [("page", "#", "command", "exit", "seconds", "")]
    for r in results:
        note = r.status if r.status != "ok" else ""
        if r.reason:
            note = f"{note}: {r.reason}" if note else r.reason
        command = r.command if len(r.command) <= 90 else r.command[:87] + "..."
        rows.append((r.page, str(r.index), command, "-" if r.exit is None else str(r.exit), f"{r.seconds:.1f}", note))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(row[c].ljust(widths[c]) if c != 4 else row[c].rjust(widths[c]) for c in range(5))
                     + (f"  {row[5]}" if row[5] else ""))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", action="append", default=[], help="run only this page (repeatable): README, cli, ...")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command (default 600)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--list", action="store_true", help="print the commands and directives; run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories (their path is printed)")
    parser.add_argument("--venv", help="the virtual environment to run with (default: .venv, else the current one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each command's last output lines")
    args = parser.parse_args(argv)

    chosen = select(pages(), args.page)
    extracted = {page_name(p): extract(p) for p in chosen}
    if args.list:
        for name, commands in extracted.items():
            print(name)
            for c in commands:
                print(f"  [{c.index:2d}] line {c.line}: {c.label}" + (f"   (skip: {c.skip})" if c.skip else ""))
        return 0

    started = time.perf_counter()
    venv = find_venv(args.venv)
    if venv is None:
        print(f"no virtual environment: running {SETUP} in {ROOT}", flush=True)
        subprocess.run([str(ROOT / "tools" / "setup.sh")], cwd=ROOT, check=True)
        venv = ROOT / ".venv"
    scratch_root = Path(tempfile.mkdtemp(prefix="check_docs-"))
    results: list[Result] = []
    try:
        for name, commands in extracted.items():
            print(f"{name}: {len(commands)} commands", flush=True)
            results += run_page(commands, scratch_root / name.replace("/", "_").removesuffix(".md"), venv,
                                args.timeout, args.verbose)
    finally:
        if args.keep:
            print(f"scratch directories kept under {scratch_root}")
        else:
            shutil.rmtree(scratch_root, ignore_errors=True)
    total = time.perf_counter() - started

    print()
    print(table([r for r in results if r.kind != "file"]))
    counted = [r for r in results if r.kind != "file"]
    failed = [r for r in counted if r.status in ("failed", "timeout")]
    skipped = [r for r in counted if r.status == "skipped"]
    ran = [r for r in counted if r.status != "skipped"]
    print(f"\n{len(ran)} run, {len(skipped)} skipped, {len(failed)} failed, {total / 60:.1f} min in all")
    for r in failed:
        print(f"FAILED {r.page}:{r.line} (exit {r.exit}): {r.command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "pages": list(extracted), "run": len(ran), "skipped": len(skipped), "failed": len(failed),
            "total_seconds": round(total, 1), "results": [asdict(r) for r in results]}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
