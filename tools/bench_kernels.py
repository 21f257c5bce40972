"""Single-kernel rates across sizes: the data a work-dependent compute model is fitted and checked against.

    PYTHONPATH=. python tools/bench_kernels.py [--dry] [--json F] [--budget SECONDS]

It times, each with CUDA events (the clock on a CPU), median of repeats after a warm-up:
- the per-kernel floor: a one-element add queued 2,000 times (host dispatch, eager) and replayed from a
  CUDA graph (the GPU's own floor per kernel, without the host);
- bf16 GEMMs over the row counts SD-1.5's linear layers see (tokens x batch) at its channel widths;
- SD-1.5's 3x3 convolutions at its four resolutions over batches 1-32, forward and forward+backward;
- flash-style attention (``scaled_dot_product_attention``) at SD-1.5's self- and cross-attention shapes;
- GroupNorm + SiLU (memory-bound) at SD-1.5's activation sizes;
- AdamW over 860M fp32 parameters (SD-1.5's count), ``foreach`` and ``fused``.

Each row has the op, shape, FLOPs, bytes an unfused kernel moves, and seconds; rates follow from them.
``--dry`` runs tiny sizes on CPU to prove the script; its numbers say nothing about GPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# SD-1.5's UNet: channels and latent side per resolution level (512 px -> 64x64 latents)
LEVELS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]
HEADS = 8


class Timer:
    def __init__(self, device: torch.device, deadline: float) -> None:
        self.device, self.deadline = device, deadline

    def seconds(self, fn: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
        """Median seconds of one ``fn()``, each call timed on its own (events on CUDA)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begun = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begun)
        return statistics.median(times)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def captured(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after one warm-up run on a side stream (as torch's capture requires)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    return graph


def launch_floor(timer: Timer, device: torch.device) -> list[dict[str, Any]]:
    """Seconds per tiny kernel, queued eagerly (host-bound) and from a CUDA graph (GPU-bound)."""
    x = torch.zeros(1, device=device)
    calls = 2000 if device.type == "cuda" else 200

    def eager() -> None:
        for _ in range(calls):
            x.add_(1.0)

    rows = [{"op": "launch", "mode": "eager", "calls": calls, "seconds": timer.seconds(eager, 5, 1) / calls}]
    if device.type == "cuda":
        rows.append({"op": "launch", "mode": "cuda_graph", "calls": calls,
                     "seconds": timer.seconds(captured(eager).replay, 5, 1) / calls})
    return rows


def gemms(timer: Timer, device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    rows = []
    widths = [(320, 320), (320, 1280), (640, 640), (1280, 1280), (1280, 5120)] if not dry else [(64, 64)]
    tokens = [64, 256, 1024, 4096, 16384, 65536, 262144] if not dry else [64, 1024]
    for k, n in widths:
        for m in tokens:
            if timer.out_of_time():
                return rows
            a = torch.randn(m, k, device=device, dtype=dtype)
            w = torch.randn(n, k, device=device, dtype=dtype)
            seconds = timer.seconds(lambda a=a, w=w: F.linear(a, w))
            rows.append({"op": "gemm", "m": m, "n": n, "k": k, "flops": 2 * m * n * k,
                         "bytes": (m * k + n * k + m * n) * a.element_size(), "seconds": seconds})
    return rows


def convs(timer: Timer, device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    rows = []
    levels = LEVELS if not dry else [(32, 16)]
    for channels, side in levels:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
        for batch in [1, 2, 4, 8, 16, 32] if not dry else [1, 4]:
            if timer.out_of_time():
                return rows
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
            flops = 2 * batch * channels * channels * 9 * side * side
            forward = timer.seconds(lambda x=x, conv=conv: conv(x))

            def both(x: torch.Tensor = x, conv: torch.nn.Module = conv) -> None:
                conv(x).sum().backward()

            rows.append({"op": "conv3x3", "batch": batch, "channels": channels, "side": side, "flops": flops,
                         "bytes": (2 * x.numel() + conv.weight.numel()) * x.element_size(),
                         "seconds": forward, "seconds_fwd_bwd": timer.seconds(both)})
    return rows


def attentions(timer: Timer, device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    rows = []
    levels = LEVELS[:3] if not dry else [(32, 8)]
    for channels, side in levels:
        head_dim, seq = channels // HEADS, side * side
        for batch in [1, 2, 8] if not dry else [1]:
            for kv in (seq, 77):
                if timer.out_of_time():
                    return rows
                q = torch.randn(batch, HEADS, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                k = torch.randn(batch, HEADS, kv, head_dim, device=device, dtype=dtype, requires_grad=True)
                v = torch.randn(batch, HEADS, kv, head_dim, device=device, dtype=dtype, requires_grad=True)
                flops = 4 * batch * HEADS * seq * kv * head_dim
                forward = timer.seconds(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))

                def both(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
                    F.scaled_dot_product_attention(q, k, v).sum().backward()

                rows.append({"op": "attention", "batch": batch, "heads": HEADS, "seq": seq, "kv": kv,
                             "head_dim": head_dim, "flops": flops, "seconds": forward,
                             "seconds_fwd_bwd": timer.seconds(both)})
    return rows


def norms(timer: Timer, device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    rows = []
    for channels, side in LEVELS if not dry else [(32, 16)]:
        norm = torch.nn.GroupNorm(32, channels, device=device, dtype=dtype)
        for batch in [1, 4, 16] if not dry else [2]:
            if timer.out_of_time():
                return rows
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
            rows.append({"op": "groupnorm", "batch": batch, "channels": channels, "side": side,
                         "bytes": 2 * x.numel() * x.element_size(),
                         "seconds": timer.seconds(lambda x=x, norm=norm: norm(x))})
            rows.append({"op": "silu", "batch": batch, "channels": channels, "side": side,
                         "bytes": 2 * x.numel() * x.element_size(), "seconds": timer.seconds(lambda x=x: F.silu(x))})
    return rows


def optimizers(timer: Timer, device: torch.device, dry: bool) -> list[dict[str, Any]]:
    """AdamW over SD-1.5's parameter count in ~700 tensors (its layout), fp32 state."""
    total, tensors = (859_520_964, 686) if not dry else (2_000_000, 50)
    sizes = [total // tensors] * tensors
    rows = []
    for mode in ("foreach", "fused") if device.type == "cuda" else ("foreach",):
        if timer.out_of_time():
            return rows
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-4, **{mode: True})
        rows.append({"op": "adamw", "mode": mode, "params": sum(sizes), "tensors": tensors,
                     "bytes": 28 * sum(sizes),  # read p, g, m, v and write p, m, v: 7 fp32 per parameter
                     "seconds": timer.seconds(optimizer.step, 5, 2)})
        del params, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def unet_forward(timer: Timer, device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    """The whole UNet's inference forward (one sampling step's model call), eager and from a CUDA graph: what
    a sampler pays per step at small batches, where per-kernel floors dominate."""
    from pase.models.zoo import resolve_model

    spec = resolve_model("unet-tiny" if dry else "sd15-unet")
    torch.manual_seed(0)
    model = spec.build().to(device=device, dtype=dtype).eval()
    rows = []
    for batch in [1, 2, 8] if not dry else [2]:
        if timer.out_of_time():
            return rows
        args, kwargs = spec.example_inputs(batch, dtype=dtype, device=device)

        def forward(args: tuple[Any, ...] = args, kwargs: dict[str, Any] = kwargs) -> None:
            with torch.no_grad():
                model(*args, **kwargs)

        row = {"op": "unet_forward", "model": spec.name, "batch": batch, "seconds": timer.seconds(forward, 5, 2)}
        if device.type == "cuda":
            row["seconds_cuda_graph"] = timer.seconds(captured(forward).replay, 5, 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on CPU: the script, not the numbers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--budget", type=float, default=150, help="seconds; later groups are cut when spent")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    timer = Timer(device, time.monotonic() + args.budget)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    groups: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("launch", lambda: launch_floor(timer, device)),
        ("adamw", lambda: optimizers(timer, device, args.dry)),
        ("conv", lambda: convs(timer, device, dtype, args.dry)),
        ("attention", lambda: attentions(timer, device, dtype, args.dry)),
        ("gemm", lambda: gemms(timer, device, dtype, args.dry)),
        ("norm", lambda: norms(timer, device, dtype, args.dry)),
        ("unet_forward", lambda: unet_forward(timer, device, dtype, args.dry))]
    for name, group in groups:
        if timer.out_of_time():
            print(f"[bench_kernels] {name}: skipped, budget spent", flush=True)
            continue
        begun = time.monotonic()
        try:
            found = group()
        except Exception as exc:  # noqa: BLE001 - one group's failure is recorded, the others still run
            found = [{"op": name, "error": f"{type(exc).__name__}: {exc}"[:300]}]
        rows += found
        print(f"[bench_kernels] {name}: {len(found)} rows in {time.monotonic() - begun:.1f} s", flush=True)
    for row in rows:
        if "flops" in row and row.get("seconds"):
            row["tflops"] = round(row["flops"] / row["seconds"] / 1e12, 3)
        if "bytes" in row and row.get("seconds") and row["op"] in ("groupnorm", "silu", "adamw"):
            row["gbps"] = round(row["bytes"] / row["seconds"] / 1e9, 1)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "dtype": str(dtype), "torch": torch.__version__,
              "seconds": round(time.monotonic() - started, 1), "rows": rows}
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
