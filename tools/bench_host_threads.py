"""Host work of ``torch.nn.DataParallel``, the one-process runtime the ParaDiGMS reference code samples with.

    PYTHONPATH=. python tools/bench_host_threads.py [--json F]

DataParallel does two things on the host on every call that a process-per-GPU runtime does not:

- it **replicates the module tree** for each GPU (``torch.nn.parallel.replicate``: a copy of every module per
  replica, each parameter and buffer set on it). Timed here with torch's own ``replicate`` on SD-1.5's UNet
  built on the meta device; the weights' broadcast is swapped for a stand-in that hands every replica the same
  tensors, so the figure is the Python tree work alone (the broadcast's transfer is priced from the link);
- its threads **dispatch every replica's operators under one interpreter lock**. Timed here as a dispatch-bound
  forward (unet-tiny at an 8x8 input, one intra-op thread) run by one thread, then by 2 threads at once: 2x the
  one-thread time means the dispatch is serialised. Only 2 threads are timed: with more threads than cores
  (2 here) the operating system's scheduling is timed too.

Both are host figures of this machine; other hosts differ. Prints the numbers and writes JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pase.models.zoo import resolve_model

# the module, not the function of that name torch.nn.parallel re-exports
replicate_module = importlib.import_module("torch.nn.parallel.replicate")

REPLICAS = 8


def replicate_seconds(model: str, replicas: int, repeats: int = 5) -> tuple[float, int, int]:
    """(best seconds of ``replicate`` for ``replicas`` devices, modules, parameters) on the meta device."""
    with torch.device("meta"):
        network = resolve_model(model).build()

    def same_tensors(tensors: list[torch.Tensor], devices: Any, detach: bool = False) -> list[list[torch.Tensor]]:
        return [[t.detach() for t in tensors] for _ in devices]

    original = replicate_module._broadcast_coalesced_reshape
    replicate_module._broadcast_coalesced_reshape = same_tensors
    try:
        devices = [torch.device("cuda", i) for i in range(replicas)]  # indices only: nothing is allocated there
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            replicate_module.replicate(network, devices, detach=True)
            best = min(best, time.perf_counter() - started)
    finally:
        replicate_module._broadcast_coalesced_reshape = original
    return best, len(list(network.modules())), len(list(network.parameters()))


def threaded_dispatch(model: str = "unet-tiny", side: int = 8, calls: int = 20, rounds: int = 5
                      ) -> tuple[float, float]:
    """(seconds of one dispatch-bound forward on one thread, seconds of a round of one forward on each of 2
    threads at once), each the median of ``rounds``."""
    torch.set_num_threads(1)
    spec = resolve_model(model)
    network = spec.build().eval()
    channels = spec.inputs[0].concrete(1)[1]
    args, kwargs = spec.example_inputs(None, device="cpu", shapes={"sample": (1, channels, side, side)})

    def run(count: int) -> None:
        with torch.no_grad():
            for _ in range(count):
                network(*args, **kwargs)

    def on_threads(count: int) -> float:
        threads = [threading.Thread(target=run, args=(calls,)) for _ in range(count)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (time.perf_counter() - started) / calls

    run(5)
    return (statistics.median(on_threads(1) for _ in range(rounds)),
            statistics.median(on_threads(2) for _ in range(rounds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench_results/host_threads.json"))
    args = parser.parse_args()
    seconds, modules, parameters = replicate_seconds("sd15-unet", REPLICAS)
    per_module_us = seconds / (modules * REPLICAS) * 1e6
    one, two = threaded_dispatch()
    result = {"replicate": {"model": "sd15-unet", "replicas": REPLICAS, "modules": modules, "parameters": parameters,
                            "seconds": seconds, "us_per_module_per_replica": per_module_us},
              "threads": {"model": "unet-tiny 8x8", "one_thread_seconds": one, "two_threads_seconds": two,
                          "ratio": two / one},
              "torch": torch.__version__}
    print(f"replicate sd15-unet ({modules} modules, {parameters} parameters) for {REPLICAS} devices: "
          f"{seconds * 1e3:.1f} ms = {per_module_us:.1f} us per module per replica")
    print(f"dispatch-bound forward: {one * 1e3:.2f} ms on one thread; {two * 1e3:.2f} ms for one on each of 2 "
          f"threads at once ({two / one:.2f}x: 2.00x is fully serialised)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
