"""Where ParaDiGMS' passes begin on a real run: body (full windows) and tail (windows the end clips), per window.

    PYTHONPATH=. python tools/bench_paradigms_layout.py [--model unet-tiny] [--steps 1000] [--json F]

Runs pase's ParaDiGMS sampler (one sample, seeded weights, DDPM, tolerance 0.1, this CPU) at windows 4-80 and
records each pass's begin. Prints passes, evaluations, the full windows and the steps they cover, the body's
advance per pass, the tail's passes, and the exponent b of the body's advance, 1 + c (window - 1)^b, fitted over
windows 8-80: the shape `sample-plan` carries a measured window's body by (``PARADIGMS_ADVANCE``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pase.sampling.core import build_core
from pase.sampling.distributed import Evaluator
from pase.sampling.paradigms import paradigms
from pase.sampling.runner import build_denoiser

WINDOWS = (4, 8, 16, 32, 64, 80)


def layout(model: str, steps: int, window: int, tol: float = 0.1) -> dict[str, float]:
    denoiser, (channels, height, width) = build_denoiser(model, 0, 1.0)
    core = build_core("ddpm", steps, clip_sample=False)
    x_t, noise = core.initial_and_noise((1, channels, height, width), 0)
    begins = [0]
    started = time.perf_counter()
    result = paradigms(core, Evaluator(denoiser, split=False), x_t, noise, window, tol,
                       progress=lambda begin, _: begins.append(begin))
    begins = begins[:-1]  # the last report is the end
    rows = [min(window, steps - b) for b in begins]
    full = sum(1 for r in rows if r == window)
    body_end = begins[full] if full < len(begins) else steps
    return {"window": window, "passes": result.passes, "evaluations": result.evals, "full_windows": full,
            "body_steps": body_end, "body_advance": body_end / max(full, 1), "tail_passes": len(begins) - full,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=Path("bench_results/paradigms_layout.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for window in WINDOWS:
        row = layout(args.model, args.steps, window)
        rows.append(row)
        print(f"window {window:3d}: {row['passes']:4d} passes, {row['evaluations']:6g} evaluations; "
              f"{row['full_windows']} full windows over {row['body_steps']} steps (advance "
              f"{row['body_advance']:.2f}), {row['tail_passes']} tail passes  ({row['seconds']:.0f} s)", flush=True)
    fitted = [r for r in rows if r["window"] >= 8 and r["body_advance"] > 1]
    exponent = float(np.polyfit(np.log([r["window"] - 1 for r in fitted]),
                                np.log([r["body_advance"] - 1 for r in fitted]), 1)[0])
    print(f"body advance ~ 1 + c (window - 1)^{exponent:.3f} over windows 8-80")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "steps": args.steps, "rows": rows,
                                     "body_exponent": exponent}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
