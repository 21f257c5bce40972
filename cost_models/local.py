"""``--cluster local``: the machine pase runs on, as a Cluster the planner can price.

On GPUs it is the NVML probe (``cost_models.probe``), cut to the first ``devices`` GPUs. Without
GPUs it is ``devices`` gloo processes on this CPU: a "cpu" device whose rates are the CPU
calibration profile's (measured collectives between the processes, measured per-layer-kind compute),
and whose memory is the host's RAM shared by the processes. The profile is the one ``pase hw
calibrate`` saved for this machine and process count, measured on first use when there is none.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cost_models.calibrate import (
    CalibrationConfig,
    default_profile_dir,
    hardware_fingerprint,
    load_profile,
    run_calibration,
    save_profile,
)
from cost_models.catalog import Catalog
from cost_models.cluster import Cluster, cluster_from_dict, group_cluster, load_cluster
from cost_models.probe import NoNvidiaDriver, probe
from pase.errors import PaseError

CPU_DEVICE = "cpu"


def host_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_profile(devices: int, path: str | Path | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The CPU calibration profile for ``devices`` gloo processes: ``path``, else this machine's saved one,
    else a fresh measurement (saved for next time)."""
    if path is not None:
        profile = load_profile(path)
    else:
        saved = default_profile_dir() / f"{hardware_fingerprint('gloo', devices)['id']}.json"
        if saved.exists():
            profile = load_profile(saved)
        else:
            if progress:
                progress(f"no CPU calibration for {devices} gloo processes yet: measuring (about 30 s, once)")
            profile = run_calibration(CalibrationConfig(nproc=devices, backend="gloo", iterations=3), progress=False)
            save_profile(profile, saved)
    if profile.get("backend") != "gloo" or profile.get("world_size") != devices:
        raise PaseError(f"the calibration profile was measured with {profile.get('world_size')} "
                        f"{profile.get('backend')} processes, not {devices} gloo processes; calibrate with "
                        f"`pase hw calibrate --nproc {devices} --backend gloo`")
    return profile


def cpu_cluster(devices: int, profile: dict[str, Any], catalog: Catalog | None = None) -> Cluster:
    """``devices`` gloo processes on this host, priced by ``profile``."""
    compute = profile.get("compute", {})
    flops = [entry["flops_per_second"] for entry in compute.values() if "flops_per_second" in entry]
    if not flops:
        raise PaseError("the calibration profile has no compute rates; re-run `pase hw calibrate`")
    peak_tflops = max(flops) / 1e12
    bandwidth = profile["memory_bandwidth"]["bytes_per_second"] / 1e9
    entry = {"id": CPU_DEVICE, "name": CPU_DEVICE, "vendor": "cpu", "arch": "cpu", "bf16_tflops": peak_tflops,
             "fp16_tflops": peak_tflops, "fp32_tflops": peak_tflops, "bf16_supported": False,
             "memory_gb": host_memory_bytes() / devices / 1e9, "memory_bw_gbps": bandwidth, "nvml_names": [CPU_DEVICE],
             "max_gpus_per_node": max(devices, 8)}
    ring = profile.get("collectives", {}).get("all_reduce", {}).get(str(devices), {})
    link = float(ring.get("busbw_gbps", 1.0))
    fabric = {"vertices": [{"id": "cpu0", "kind": "cpu"}] + [{"id": f"gpu{i}", "kind": "gpu", "index": i}
                                                             for i in range(devices)],
              "edges": [{"a": f"gpu{i}", "b": "cpu0", "kind": "pcie", "bandwidth_gbps": link,
                         "effective_gbps": link, "latency_us": float(ring.get("alpha_us", 50.0)) / 2}
                        for i in range(devices)]}
    cluster = cluster_from_dict({"gpu": entry, "gpus_per_node": devices, "fabric": fabric,
                                 "name": f"local:{devices}xcpu", "source": "local CPU (gloo), calibrated"},
                                catalog or Catalog.load(), origin="local CPU")
    return cluster


def local_cluster(devices: int | None, profile_path: str | Path | None = None, catalog: Catalog | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[Cluster, dict[str, Any] | None]:
    """(cluster, profile to price with) for this machine: its GPUs when NVML finds any, else CPU processes."""
    try:
        probed = probe()
    except NoNvidiaDriver:
        probed = None
    if probed is not None and probed.gpus:
        cluster = probed.to_cluster(catalog or Catalog.load())
        devices = devices or cluster.world_size
        if devices > cluster.world_size:
            raise PaseError(f"--devices {devices}: this machine has {cluster.world_size} GPUs")
        return group_cluster(cluster, devices), (load_profile(profile_path) if profile_path else None)
    if not devices or devices < 1:
        raise PaseError("--cluster local on a machine without GPUs plans for CPU processes: give --devices N "
                        "(the number of gloo processes torchrun will start)")
    if devices < 2:
        raise PaseError("--cluster local --devices 1 has nothing to parallelize; use --devices 2 or more")
    profile = cpu_profile(devices, profile_path, progress)
    return cpu_cluster(devices, profile, catalog), profile


def target_cluster(cluster: str, devices: int | None = None, profile: str | Path | None = None,
                   gpu_files: list[str] | None = None, progress: Callable[[str], None] | None = None
                   ) -> tuple[Cluster, dict[str, Any] | None, str]:
    """(cluster, profile to price with, default precision) for a ``--cluster`` value, the same for the CLI and the
    Python API: "local" is this machine (``local_cluster``; fp32 on CPU processes), anything else a spec or a
    system file (``devices`` is then an error: the spec says how many)."""
    catalog = Catalog.load(gpu_files or [])
    if cluster == "local":
        target, measured = local_cluster(devices, profile, catalog, progress)
        return target, measured, "fp32" if target.gpu.id == CPU_DEVICE else "bf16"
    if devices is not None:
        raise PaseError("devices go with the local cluster; a cluster spec already says how many devices")
    return load_cluster(cluster, catalog), load_profile(profile) if profile else None, "bf16"


__all__ = ["CPU_DEVICE", "cpu_cluster", "cpu_profile", "host_memory_bytes", "local_cluster", "target_cluster"]
