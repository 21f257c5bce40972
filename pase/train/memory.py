"""Peak training memory above a baseline, and the activation bytes autograd keeps for backward.

``PeakMemory`` is started just before the model is built; ``peak_bytes()`` is then the process's
peak above that level. On a GPU it is ``torch.cuda.max_memory_allocated`` minus the allocation at
start. On Linux CPU it is the larger of the kernel's high-water mark of the resident set (VmHWM), which
writing ``5`` to ``/proc/self/clear_refs`` resets, and the resident set sampled every millisecond by a
thread: the high-water mark sees allocations too short for a sample, the sampler memory the kernel
releases without raising the mark; where clear_refs cannot be written, the sampler alone.

On glibc, ``start()`` first pins malloc's mmap threshold at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``, what the
``MALLOC_MMAP_THRESHOLD_`` variable sets): glibc otherwise raises the threshold after the first large free and
serves later tensors from its heap, whose freed blocks stay resident, so the resident set would grow step after
step and the peak would measure fragmentation rather than what training holds. With the pin, every tensor of
64 KiB or more is its own mapping, returned to the kernel when freed, and the resident set follows live tensors.
"""
from __future__ import annotations

import ctypes
import gc
import re
import threading
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from cost_models.finetune_memory import ModelSizes
from pase.models.zoo import resolve_model
from strategies import silu_recompute

_STATUS = Path("/proc/self/status")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 64 * 1024
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def pin_mmap_threshold() -> bool:
    """Serve allocations of MMAP_THRESHOLD_BYTES or more from their own mappings from now on (glibc only; False
    elsewhere), so that freed tensors leave the resident set (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def current_rss_bytes() -> int:
    """The resident set of this process now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


class PeakMemory:
    """Peak memory of this process above its level at ``start()`` (see the module docstring)."""
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.method = ""
        self._baseline = 0
        self._sampled_peak = 0
        self._hwm = False  # VmHWM was reset at start (Linux), so it holds this run's peak too
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        # collect garbage first: a collection during the measured work would lower the resident set below the
        # baseline and hide as much of the peak as it freed
        gc.collect()
        pinned = pin_mmap_threshold()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
            self.method = "VmHWM (kernel high-water mark of RSS) and RSS sampled every 1 ms"
        except OSError:
            self.method = "RSS sampled every 1 ms"
        if pinned:
            self.method += f"; malloc mmap threshold {MMAP_THRESHOLD_BYTES // 1024} KiB"
        # the baseline is the level VmHWM was reset to (read after the reset: memory freed between a reading before
        # it and the reset would hide that much of the peak); the sampler runs beside VmHWM too, since the kernel
        # does not raise the high-water mark when memory is released without an unmap (seen: a 64 MiB transient
        # allocation missing from VmHWM now and then)
        self._baseline = self._sampled_peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.001):
            self._sampled_peak = max(self._sampled_peak, current_rss_bytes())

    def peak_bytes(self) -> int:
        """Peak above the baseline so far (the sampler keeps running)."""
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline)
        peak = max(self._sampled_peak, current_rss_bytes())
        hwm = _status_kib("VmHWM") if self._hwm else None
        if hwm is not None:
            peak = max(peak, hwm * 1024)
        return max(0, peak - self._baseline)

    def stop(self) -> int:
        peak = self.peak_bytes()
        if self._stop is not None:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._stop = self._thread = None
        return peak


_SDPA = F.scaled_dot_product_attention


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     **kwargs: object) -> torch.Tensor:
    if query.device.type != "meta" or attn_mask is not None or kwargs:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     **kwargs)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


def saved_activation_bytes(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of ``model`` (not its weights);
    see ``saved_activation_split``."""
    return saved_activation_split(model, *args, **kwargs)[0]


def saved_activation_split(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[int, int]:
    """(bytes autograd saves for backward in one forward of ``model``, not its weights; the part of them
    that is SiLU outputs read by a Linear or Conv2d, which TuneQDM's layers do not keep).

    Run it on the meta device (model and inputs) to price a large model without allocating it.
    Each storage counts once, so views of one tensor saved by several ops are not double-counted;
    parameters and buffers are left out (they are weights, priced separately). On meta, PyTorch's
    attention falls back to the math path, which saves the full score matrix; real CPU and GPU runs
    use a fused kernel that saves only q, k, v, the output and the log-sum-exp, so the fused
    kernel is swapped in while counting.
    """
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    silu_fed: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    def note_input(module: nn.Module, inputs: tuple[object, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and silu_recompute.silu_source(inputs[0]) is not None:
            silu_fed.add(inputs[0].untyped_storage()._cdata)

    handles = silu_recompute.tag_silu_outputs(model) + [
        module.register_forward_pre_hook(note_input) for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                mock.patch.object(F, "scaled_dot_product_attention", _fused_attention):
            output = model(*args, **kwargs)
        del output
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), sum(seen[key] for key in silu_fed if key in seen)


def model_sizes(model_name: str, batch: int, image_size: int | None = None) -> ModelSizes:
    """A zoo model's sizes for ``cost_models.finetune_memory``, counted on the meta device (nothing allocated)."""
    spec = resolve_model(model_name)
    with torch.device("meta"):
        model = spec.build()
    args, kwargs = spec.example_inputs(batch, device="meta")
    if image_size is not None and args and args[0].dim() == 4:  # the zoo checks shapes; UNets take any multiple of 8
        args = (torch.zeros(*args[0].shape[:2], image_size, image_size, device="meta"), *args[1:])
    layers = tuple((m.weight.shape[0], m.weight.shape[1], m.weight.numel()) for m in model.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)))
    config = getattr(model, "config", None)
    widths: tuple[int, ...] = ()
    if config is not None and hasattr(config, "block_out_channels") and hasattr(model, "up_blocks"):
        channels = tuple(config.block_out_channels)
        widths = channels + channels[-1:] + tuple(reversed(channels))
    saved, silu_fed = saved_activation_split(model, *args, **kwargs)
    return ModelSizes(sum(p.numel() for p in model.parameters()), layers, saved, batch, widths, silu_fed)
