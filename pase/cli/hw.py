"""``pase hw``: the hardware catalog, cluster descriptions, the NVML probe and calibration."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pase.cli.console import check_writable, console, finite, write_output
from pase.errors import PaseError

hw_app = typer.Typer(no_args_is_help=True, help="Hardware: catalog, clusters, probe, calibration.")

GpuFile = Annotated[list[Path] | None, typer.Option("--gpu-file", help="JSON/YAML catalog entries (gpus, networks, "
                                                    "efficiency, ...) merged over the built-in catalog.")]


def _catalog(gpu_file: list[Path] | None):
    from cost_models.catalog import Catalog

    return Catalog.load(gpu_file or [])


def parse_efficiency(values: list[str]) -> dict[str, float]:
    result = {}
    for value in values:
        kind, _, number = value.partition("=")
        try:
            result[kind.strip()] = float(number)
        except ValueError:
            raise PaseError(f"--efficiency {value!r}: write KIND=FRACTION, e.g. conv=0.45") from None
    return result


@hw_app.command("list")
def list_catalog(gpu_file: GpuFile = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the GPU catalog and the networks (with price ranges and their dates)."""
    catalog = _catalog(gpu_file)
    if as_json:
        print(json.dumps(catalog.data, indent=1))
        return
    table = Table(title=f"GPU catalog ({', '.join(catalog.origins)}); tensor TFLOPS dense, bandwidth per direction")
    for column in ("id", "arch/CC", "BF16 TFLOPS", "FP32 TFLOPS", "memory", "mem BW GB/s", "NVLink", "PCIe",
                   "TDP W", "$/GPU-h (typical, as of)"):
        table.add_column(column, justify="left" if column in ("id", "arch/CC", "NVLink") else "right")
    for gpu_id in catalog.gpu_ids():
        gpu = catalog.gpu(gpu_id)
        nvlink = f"gen {gpu.nvlink_generation} x{gpu.nvlink_links} {gpu.nvlink_topology}" if gpu.nvlink_generation \
            else "-"
        price = (f"{gpu.price.low:g}-{gpu.price.high:g} ({gpu.price.typical:g}"
                 + (f", {gpu.price.as_of})" if gpu.price.as_of else ")") if gpu.price else "-")
        bf16 = f"{gpu.bf16_tflops:g}" if gpu.bf16_supported else f"{gpu.fp16_tflops:g} (fp16 only)"
        table.add_row(gpu_id, f"{gpu.arch} {gpu.compute_capability}", bf16, f"{gpu.fp32_tflops:g}",
                      f"{gpu.memory_gb:g} GB", f"{gpu.memory_bw_gbps:g}", nvlink, f"gen{gpu.pcie_gen}",
                      f"{gpu.tdp_w:g}", price)
    console.print(table)
    networks = Table(title="Networks (per NIC, per direction)")
    for column in ("id", "line rate", "GB/s", "achieved", "latency us"):
        networks.add_column(column)
    for net_id in catalog.network_ids():
        net = catalog.network(net_id)
        networks.add_row(net.id, f"{net.line_gbit:g} Gb/s", f"{net.gbps:g}", f"{net.achieved_fraction:.0%}",
                         f"{net.latency_us:g}")
    console.print(networks)
    from cost_models.cluster import SPEC_GRAMMAR

    console.print(f"Cluster specs: {escape(SPEC_GRAMMAR)}")


@hw_app.command("show")
def show(
    spec: Annotated[str, typer.Argument(help="Cluster spec (8xH100-SXM) or a JSON/YAML system file.")],
    gpu_file: GpuFile = None,
    price: Annotated[float | None, typer.Option(callback=finite, help="Override $/GPU-hour.")] = None,
    efficiency: Annotated[list[str] | None, typer.Option(help="Override an op kind's efficiency, e.g. conv=0.45.")]
    = None,
    profile: Annotated[Path | None, typer.Option(help="A calibration profile to price with.")] = None,
    precision: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster description as JSON.")] = False,
) -> None:
    """Describe one cluster: GPUs, links (a topology matrix like nvidia-smi topo -m), network, rates."""
    from cost_models.calibrate import load_profile
    from cost_models.cluster import load_cluster
    from cost_models.rates import profile_mismatch

    cluster = load_cluster(spec, _catalog(gpu_file)).with_overrides(price, parse_efficiency(efficiency or []))
    if as_json:
        print(json.dumps(cluster.to_dict(), indent=1))
        return
    measured = load_profile(profile) if profile else None
    if measured is not None and (reason := profile_mismatch(cluster, measured)):
        raise PaseError(reason)
    print_cluster(cluster, measured, precision)


def print_cluster(cluster, profile=None, precision: str = "bf16") -> None:  # noqa: ANN001 - Cluster, dict
    from cost_models.rates import HardwareRates

    gpu = cluster.gpu
    summary = Table(title=f"{cluster.spec}: {cluster.world_size} x {gpu.name} ({cluster.source})", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("nodes x GPUs", f"{cluster.nodes} x {cluster.gpus_per_node}")
    summary.add_row("per GPU", f"{gpu.peak_tflops(precision):g} TFLOPS {precision} (dense), {gpu.fp32_tflops:g} fp32, "
                               f"{gpu.memory_gb:g} GB at {gpu.memory_bw_gbps:g} GB/s, {gpu.tdp_w:g} W")
    total = gpu.peak_tflops(precision) * cluster.world_size
    memory = gpu.memory_gb * cluster.world_size
    summary.add_row("whole cluster", f"{total / 1000:.3g} PFLOPS {precision}, {memory:g} GB")
    if cluster.network:
        net = cluster.network
        per_gpu = net.gbps * cluster.nics_per_node / cluster.gpus_per_node
        summary.add_row("network", f"{net.id}: {cluster.nics_per_node} NICs/node x {net.gbps:g} GB/s "
                                   f"= {per_gpu:g} GB/s per GPU ({net.achieved_fraction:.0%} achieved)")
    if gpu.price:
        p = gpu.price
        origin = ", ".join(part for part in (p.as_of, p.source) if part)
        summary.add_row("price", f"${p.low:g}-{p.high:g} per GPU-hour (typical ${p.typical:g}"
                                 + (f"; {origin}" if origin else "")
                                 + f"); cluster ${p.typical * cluster.world_size:.2f}/h")
    for note in cluster.notes:
        summary.add_row("note", note)
    console.print(summary)
    console.print(topology_table(cluster))
    rates = HardwareRates(cluster, profile, precision)
    table = Table(title="rates the cost model uses")
    for column in ("op kind", "rate", "source"):
        table.add_column(column)
    for kind in ("conv", "linear", "matmul", "attention"):
        rate = rates.compute(kind)
        table.add_row(kind, f"{rate.value / 1e12:.3g} TFLOP/s", rate.source)
    memory = rates.memory()
    table.add_row("memory-bound ops", f"{memory.value / 1e9:.3g} GB/s", memory.source)
    if cluster.world_size > 1:
        for rate in rates.collective_algorithms("all_reduce", list(range(cluster.world_size))):
            table.add_row(f"all-reduce over {cluster.world_size} ({rate.algorithm})",
                          f"busbw {rate.busbw_gbps:.3g} GB/s, latency {rate.alpha_s * 1e6:.3g} us", rate.source)
    console.print(table)


def topology_table(cluster) -> Table:  # noqa: ANN001 - Cluster
    n = min(cluster.gpus_per_node, 16)
    table = Table(title="topology of one node (like nvidia-smi topo -m): link type / effective GB/s per direction"
                        + (f"; first {n} GPUs" if n < cluster.gpus_per_node else ""))
    table.add_column("")
    for j in range(n):
        table.add_column(f"GPU{j}", justify="center")
    matrix = cluster.topology_matrix()
    for i in range(n):
        table.add_row(f"GPU{i}", *[("X" if i == j else f"{matrix[i][j].label} {matrix[i][j].effective_gbps:.4g}")
                                   for j in range(n)])
    return table


@hw_app.command("probe")
def probe_command(
    replay: Annotated[Path | None, typer.Option(help="Replay a recorded NVML session instead of the driver.")] = None,
    record: Annotated[Path | None, typer.Option(help="Record the driver's NVML answers to this file.")] = None,
    save: Annotated[Path | None, typer.Option(help="Save the probed cluster as a system file (JSON).")] = None,
    gpu_file: GpuFile = None,
) -> None:
    """Probe this machine's GPUs and links with NVML (pynvml) and print the topology matrix."""
    from cost_models.nvml_replay import ReplayNVML, record_nvml
    from cost_models.probe import NoNvidiaDriver, level_name, probe

    check_writable(record, "--record")
    check_writable(save, "--save")
    nvml = ReplayNVML.from_file(replay) if replay else None
    try:
        if record:
            if nvml is not None:
                raise PaseError("--record reads the live driver; it cannot be combined with --replay")
            import pynvml

            try:
                recording = record_nvml(pynvml)
            except pynvml.NVMLError_LibraryNotFound:
                raise NoNvidiaDriver("no NVIDIA driver on this machine (NVML library not found): nothing to "
                                     "record") from None
            record.write_text(json.dumps(recording, indent=1))
            console.print(f"recorded NVML answers for {len(recording['devices'])} GPUs to {record}")
        result = probe(nvml) if nvml is not None else probe()
    except NoNvidiaDriver as exc:
        console.print(f"[yellow]{exc}[/]", highlight=False)
        return
    table = Table(title=f"GPUs (driver {result.driver_version or 'unknown'})")
    for column in ("#", "name", "bus id", "memory", "CC", "SM / mem MHz", "PCIe (max)", "NVLinks", "unavailable"):
        table.add_column(column)
    for gpu in result.gpus:
        cc = ".".join(map(str, gpu.compute_capability)) if gpu.compute_capability else "?"
        links = f"{len(gpu.nvlinks)} (gen {gpu.nvlinks[0].generation})" if gpu.nvlinks else "-"
        table.add_row(str(gpu.index), gpu.name, gpu.bus_id or "?",
                      f"{gpu.memory_bytes / 2**30:.1f} GiB" if gpu.memory_bytes else "?", cc,
                      f"{gpu.sm_clock_mhz or '?'} / {gpu.memory_clock_mhz or '?'}",
                      f"gen{gpu.pcie_gen or '?'} x{gpu.pcie_width or '?'}", links,
                      ", ".join(f"{k} ({v})" for k, v in gpu.degraded.items()) or "-")
    console.print(table)
    levels = Table(title="PCIe common ancestor (NVML) per pair")
    levels.add_column("")
    for j in range(len(result.gpus)):
        levels.add_column(f"GPU{j}", justify="center")
    for i, row in enumerate(result.ancestor):
        levels.add_row(f"GPU{i}", *[level_name(level) for level in row])
    console.print(levels)
    cluster = result.to_cluster(_catalog(gpu_file))
    print_cluster(cluster)
    if save:
        save.write_text(json.dumps(cluster.to_dict(), indent=1))
        console.print(f"saved the probed cluster to {save}; use it with --cluster {save}")


@hw_app.command("calibrate")
def calibrate_command(
    nproc: Annotated[int, typer.Option(help="Processes (GPUs with NCCL; CPU processes with gloo); 1 times compute "
                                       "and memory only.")] = 2,
    backend: Annotated[str | None, typer.Option(help="nccl or gloo (default: nccl when CUDA is available).")] = None,
    model: Annotated[str, typer.Option(help="Zoo model or LayerGraph JSON whose layer shapes are timed.")]
    = "unet-tiny",
    batch: Annotated[int, typer.Option(min=1, help="Batch of that model's layers.")] = 2,
    sizes: Annotated[str | None, typer.Option(help="Message sizes, e.g. 4K,1M,16M (default: a sweep).")] = None,
    iterations: Annotated[int, typer.Option(min=1)] = 5,
    precision: Annotated[str, typer.Option(help="Compute dtype on GPUs: bf16, fp16, fp32.")] = "bf16",
    out: Annotated[Path | None, typer.Option(help="Write the profile here (default: the per-user cache).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
) -> None:
    """Measure collectives and per-layer-kind compute rates; save a calibration profile."""
    import torch

    from cost_models.calibrate import CalibrationConfig, run_calibration, save_profile

    if backend not in (None, "nccl", "gloo"):
        raise PaseError(f"--backend must be nccl or gloo, not {backend!r}")
    check_writable(out, "--out")  # before minutes of measuring
    config = CalibrationConfig(nproc=nproc, backend=backend, sizes=parse_sizes(sizes) if sizes else [],
                               iterations=iterations, model=model, batch=batch,
                               precision=precision if torch.cuda.is_available() else "fp32")
    profile = run_calibration(config, progress=not as_json)
    if out is None:
        path = save_profile(profile, None)
    else:
        write_output(out, "--out", lambda target: save_profile(profile, target), announce=False)
        path = out
    if as_json:
        print(json.dumps(profile, indent=1))
        return
    print_profile(profile)
    console.print(f"saved {path}")


def parse_sizes(text: str) -> list[int]:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (part[:-1], part[-1]) if part and part[-1] in units else (part, "")
        try:
            value = int(float(number) * units[unit])
        except ValueError:
            raise PaseError(f"--sizes: cannot read {part!r}; write sizes like 4K,1M,64M") from None
        if value < 4:
            raise PaseError(f"--sizes: {part!r} is smaller than one float32")
        sizes.append(value)
    return sizes


def print_profile(profile: dict) -> None:
    fingerprint = profile["fingerprint"]
    table = Table(title=f"collectives over {profile['world_size']} {profile['device']} processes "
                        f"({profile['backend']}), as nccl-tests reports them")
    for column in ("op x group size", "bytes", "time us", "algbw GB/s", "busbw GB/s"):
        table.add_column(column, justify="right")
    for op, by_group in profile["collectives"].items():
        for group, entry in by_group.items():
            name = f"{op} x{group}"
            for point in entry["points"]:
                table.add_row(name, f"{point['bytes']:,}", f"{point['seconds'] * 1e6:.1f}",
                              f"{point['algbw_gbps']:.3f}", f"{point['busbw_gbps']:.3f}")
            table.add_row(f"[bold]{name} fit[/]", "", f"alpha {entry['alpha_us']:.1f}", f"{entry['algbw_gbps']:.3f}",
                          f"{entry['busbw_gbps']:.3f}", end_section=True)
    console.print(table)
    compute = Table(title=f"compute, forward + backward, per layer kind of {profile['layer_graph']['model']}")
    for column in ("kind", "achieved", "layers timed"):
        compute.add_column(column)
    for kind, entry in profile["compute"].items():
        rate = (f"{entry['flops_per_second'] / 1e9:.3g} GFLOP/s" if "flops_per_second" in entry
                else f"{entry['bytes_per_second'] / 1e9:.3g} GB/s")
        compute.add_row(kind, rate, ", ".join(s["layer"] for s in entry["samples"]))
    compute.add_row("memory copy", f"{profile['memory_bandwidth']['bytes_per_second'] / 1e9:.3g} GB/s", "")
    console.print(compute)
    console.print(f"fingerprint {fingerprint['id']}: {fingerprint['cpu']}, devices {fingerprint['devices']}")
