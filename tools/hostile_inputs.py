"""Hostile inputs at scale: the property-based targets of tests/hostile_targets.py (mutated plan files, cost graphs,
calibration profiles, NVML recordings, safetensors files, mistyped command-line options), each run for --examples
cases. Prints, per target, the cases tried, how many were accepted (valid input) or refused in one clean line,
and every case that ended otherwise (a traceback a user would see); writes the counts as JSON with --json.

    .venv/bin/python tools/hostile_inputs.py [--examples 500] [--seed 0] [--json bench_results/hostile.json]

The default suite runs the same targets with 40 cases each (tests/test_hostile_inputs.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hostile_targets as targets  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _targets() -> dict[str, tuple[st.SearchStrategy, object]]:
    plan = targets.plan_base()[0]
    profile = json.loads(targets.PROFILE.read_text())
    recording = json.loads(targets.RECORDING.read_text())
    return {
        "plan file": (targets.mutated(plan), targets.plan_case),
        "cost graph": (targets.mutated(targets.cost_graph_base()), targets.cost_graph_case),
        "calibration profile": (targets.mutated(profile), targets.profile_case),
        "NVML recording": (targets.mutated(recording), targets.recording_case),
        "safetensors file": (targets.safetensors_bytes(), targets.safetensors_case),
        "command line": (targets.cli_case(), targets.run_cli),
    }


def _checker(strategy: st.SearchStrategy, case: object, tried: Counter, failures: list[str], examples: int,
             chosen_seed: int) -> object:
    """A hypothesis test of ``case`` that counts every case and keeps going past failures (collected)."""
    @seed(chosen_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(value: object) -> None:
        tried["cases"] += 1
        try:
            case(value)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - a traceback a user would see: counted, shown, not fatal
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")

    return check


def run(examples: int, chosen_seed: int) -> dict[str, dict]:
    report: dict[str, dict] = {}
    for name, (strategy, case) in _targets().items():
        failures: list[str] = []
        tried: Counter = Counter()
        started = time.perf_counter()
        _checker(strategy, case, tried, failures, examples, chosen_seed)()
        seconds = time.perf_counter() - started
        outcomes = {outcome: n for (target, outcome), n in targets.TALLY.counts.items() if target == name}
        report[name] = {"cases": tried["cases"], **outcomes, "tracebacks": len(failures), "seconds": round(seconds, 1),
                        "examples_of_tracebacks": sorted(set(failures))[:10]}
        print(f"{name:20s} {tried['cases']:6d} cases  {outcomes.get('ok', 0):6d} accepted  "
              f"{outcomes.get('clean', 0):6d} clean errors  {len(failures):4d} tracebacks  {seconds:7.1f} s",
              flush=True)
        for failure in sorted(set(failures))[:5]:
            print(f"    {failure}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.examples, args.seed)
    total = {key: sum(r.get(key, 0) for r in report.values()) for key in ("cases", "ok", "clean", "tracebacks")}
    print(f"{'all':20s} {total['cases']:6d} cases  {total['ok']:6d} accepted  {total['clean']:6d} clean errors  "
          f"{total['tracebacks']:4d} tracebacks  {time.perf_counter() - started:7.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"examples": args.examples, "seed": args.seed, "targets": report,
                                         "total": total}, indent=1))
    sys.exit(1 if total["tracebacks"] else 0)


if __name__ == "__main__":
    main()
