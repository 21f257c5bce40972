"""Record NVML's answers on a real machine, and replay them through the same probe code.

A recording (format ``pase-nvml-recording``) stores, per device, what each pynvml function
returned (or which NVMLError it raised), and per GPU pair the common-ancestor level and P2P
status. ``ReplayNVML`` answers the probe's calls from such a file with the real pynvml
constants and exception classes, so tests exercise the probe's own parsing on machines we do
not have. ``record_nvml`` writes such a file from a live driver (``pase hw probe --record``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pynvml

from pase.errors import PaseError
from pase.schema import read_json, schema_error

RECORDING_FORMAT = "pase-nvml-recording"
P2P_READ, P2P_NVLINK = 0, 2  # NVML_P2P_CAPS_INDEX_*; pynvml 13.x defines READ as the tuple (0,), so use ints
CLOCK_SM, CLOCK_MEM = 1, 2
ERRORS = {
    "NotSupported": pynvml.NVML_ERROR_NOT_SUPPORTED, "InvalidArgument": pynvml.NVML_ERROR_INVALID_ARGUMENT,
    "FunctionNotFound": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, "NoPermission": pynvml.NVML_ERROR_NO_PERMISSION,
    "Unknown": pynvml.NVML_ERROR_UNKNOWN, "GpuIsLost": pynvml.NVML_ERROR_GPU_IS_LOST,
}
ERROR_NAMES = {code: name for name, code in ERRORS.items()}

DEVICE_FUNCTIONS = (  # plain per-device calls: (function name, extra argument or None)
    ("nvmlDeviceGetName", None), ("nvmlDeviceGetUUID", None), ("nvmlDeviceGetPciInfo", None),
    ("nvmlDeviceGetMemoryInfo", None), ("nvmlDeviceGetCudaComputeCapability", None),
    ("nvmlDeviceGetArchitecture", None), ("nvmlDeviceGetMemoryBusWidth", None),
    ("nvmlDeviceGetPowerManagementLimit", None), ("nvmlDeviceGetMaxPcieLinkGeneration", None),
    ("nvmlDeviceGetMaxPcieLinkWidth", None), ("nvmlDeviceGetCurrPcieLinkGeneration", None),
    ("nvmlDeviceGetCurrPcieLinkWidth", None),
)
LINK_FUNCTIONS = ("nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkVersion", "nvmlDeviceGetNvLinkRemotePciInfo",
                  "nvmlDeviceGetNvLinkRemoteDeviceType")

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"enum": sorted(ERRORS)}}}


def _answer_of(schema: dict[str, Any]) -> dict[str, Any]:
    """A recorded answer: the value NVML returned (``schema``) or the error it raised."""
    return {"anyOf": [schema, _ERROR]}


_INT = {"type": "integer", "minimum": 0, "maximum": 2**63}
_PCI = {"type": "object", "required": ["busId"], "properties": {"busId": {"type": "string"}}}
_DEVICE_VALUES: dict[str, dict[str, Any]] = {
    "nvmlDeviceGetName": {"type": "string"}, "nvmlDeviceGetUUID": {"type": "string"}, "nvmlDeviceGetPciInfo": _PCI,
    "nvmlDeviceGetMemoryInfo": {"type": "object", "required": ["total"], "properties": {"total": _INT}},
    "nvmlDeviceGetCudaComputeCapability": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2},
    "nvmlDeviceGetArchitecture": _INT, "nvmlDeviceGetMemoryBusWidth": _INT, "nvmlDeviceGetPowerManagementLimit": _INT,
    "nvmlDeviceGetMaxPcieLinkGeneration": _INT, "nvmlDeviceGetMaxPcieLinkWidth": _INT,
    "nvmlDeviceGetCurrPcieLinkGeneration": _INT, "nvmlDeviceGetCurrPcieLinkWidth": _INT,
    "nvmlDeviceGetMaxClockInfo": {"type": "object", "additionalProperties": _answer_of(_INT)},
    **{function: {"type": "array", "items": _answer_of(_PCI if function.endswith("PciInfo") else _INT)}
       for function in LINK_FUNCTIONS},
}
_MATRIX = {"type": "array", "items": {"type": "array", "items": _answer_of(_INT)}}
# What the probe reads from a recording, declared once and checked on load (a hand-edited or foreign file is one
# line naming the field, never a traceback from inside the probe).
RECORDING_JSON_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["format", "devices"],
    "properties": {
        "format": {"const": RECORDING_FORMAT},
        "system": {"type": "object", "properties": {"nvmlSystemGetDriverVersion": _answer_of({"type": "string"})}},
        "devices": {"type": "array", "items": {"type": "object", "properties": {
            name: _answer_of(schema) for name, schema in _DEVICE_VALUES.items()}}},
        "pairs": {"type": "object", "properties": {
            "nvmlDeviceGetTopologyCommonAncestor": _MATRIX,
            "nvmlDeviceGetP2PStatus": {"type": "object", "additionalProperties": _MATRIX}}},
    },
}


def check_recording(recording: Any) -> None:
    """Raise one ``PaseError`` line naming the first field of ``recording`` that NVML could not have answered."""
    problem = schema_error(recording, RECORDING_JSON_SCHEMA)
    if problem is not None:
        raise PaseError(f"not an NVML recording pase can replay: {problem[:300]}; record one with "
                        "`pase hw probe --record FILE`")


class _Struct:
    """Attribute access over a recorded struct (``.busId``, ``.total``), like pynvml's structures."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


class ReplayNVML:
    """Answers pynvml calls from a recording; unknown attributes fall through to pynvml (constants)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, recording: dict[str, Any]) -> None:
        format_ = recording.get("format") if isinstance(recording, dict) else None
        if format_ != RECORDING_FORMAT:
            raise PaseError(f"not an NVML recording (format {format_!r}, want {RECORDING_FORMAT!r})")
        check_recording(recording)
        count = len(recording["devices"])
        pairs = recording.get("pairs", {})
        matrices = [("nvmlDeviceGetTopologyCommonAncestor", pairs.get("nvmlDeviceGetTopologyCommonAncestor")),
                    *((f"nvmlDeviceGetP2PStatus.{k}", v) for k, v in pairs.get("nvmlDeviceGetP2PStatus", {}).items())]
        for name, matrix in matrices:
            if matrix is not None and (len(matrix) != count or any(len(row) != count for row in matrix)):
                raise PaseError(f"not an NVML recording pase can replay: pairs.{name} must be {count}x{count} (one "
                                "row and column per device); record one with `pase hw probe --record FILE`")
        if count > 1 and pairs.get("nvmlDeviceGetTopologyCommonAncestor") is None:
            raise PaseError("not an NVML recording pase can replay: pairs.nvmlDeviceGetTopologyCommonAncestor is "
                            "missing; record one with `pase hw probe --record FILE`")
        self.recording = recording
        self.devices: list[dict[str, Any]] = recording["devices"]
        self.pairs: dict[str, Any] = recording.get("pairs", {})

    @classmethod
    def from_file(cls, path: str | Path) -> ReplayNVML:
        fix = "record one with `pase hw probe --record FILE` on a machine with NVIDIA GPUs"
        try:
            return cls(read_json(path, "NVML recording", fix))
        except PaseError as exc:
            message = str(exc)
            raise PaseError(message if str(path) in message else f"{path}: {message}") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(pynvml, name)

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, dict) and "error" in value:
            raise pynvml.NVMLError(ERRORS[value["error"]])
        if isinstance(value, dict):
            return _Struct(value)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return tuple(value)
        return value

    def _device_value(self, handle: int, function: str) -> Any:
        device = self.devices[handle]
        if function not in device:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return device[function]

    # -- system
    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._answer(self.recording.get("system", {}).get("nvmlSystemGetDriverVersion", {"error": "Unknown"}))

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    # -- per device (the plain calls are attached below the class)
    def nvmlDeviceGetMaxClockInfo(self, handle: int, clock_type: int) -> int:
        clocks = self._device_value(handle, "nvmlDeviceGetMaxClockInfo")
        if isinstance(clocks, dict) and "error" in clocks:
            return self._answer(clocks)
        return self._answer(clocks.get(str(clock_type), {"error": "NotSupported"}))

    def _per_link(self, handle: int, function: str, link: int) -> Any:
        values = self._device_value(handle, function)
        if isinstance(values, dict):
            return self._answer(values)
        if not 0 <= link < len(values):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._answer(values[link])

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        return self._per_link(handle, "nvmlDeviceGetNvLinkState", link)

    def nvmlDeviceGetNvLinkVersion(self, handle: int, link: int) -> int:
        return self._per_link(handle, "nvmlDeviceGetNvLinkVersion", link)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: int, link: int) -> Any:
        return self._per_link(handle, "nvmlDeviceGetNvLinkRemotePciInfo", link)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: int, link: int) -> int:
        return self._per_link(handle, "nvmlDeviceGetNvLinkRemoteDeviceType", link)

    # -- pairs
    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return self._answer(self.pairs["nvmlDeviceGetTopologyCommonAncestor"][a][b])

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        table = self.pairs.get("nvmlDeviceGetP2PStatus", {}).get(str(index))
        if table is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._answer(table[a][b])


for _function, _ in DEVICE_FUNCTIONS:  # the plain per-device calls share one implementation
    setattr(ReplayNVML, _function, (lambda name: lambda self, handle: self._answer(self._device_value(handle, name)))(
        _function))


def record_nvml(nvml: Any = pynvml) -> dict[str, Any]:
    """Call every function the probe uses on a live driver and store the answers (or errors)."""
    def grab(function: Any, *args: Any) -> Any:
        try:
            value = function(*args)
        except pynvml.NVMLError as exc:
            return {"error": ERROR_NAMES.get(exc.value, "Unknown")}
        if hasattr(value, "_fields_"):
            return {name: _plain(getattr(value, name)) for name, _ in value._fields_}
        return _plain(value)

    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        devices = []
        for handle in handles:
            device = {name: grab(getattr(nvml, name), handle) for name, _ in DEVICE_FUNCTIONS}
            device["nvmlDeviceGetMaxClockInfo"] = {str(c): grab(nvml.nvmlDeviceGetMaxClockInfo, handle, c)
                                                   for c in (CLOCK_SM, CLOCK_MEM)}
            for function in LINK_FUNCTIONS:
                answers: list[Any] = []
                no_nvlink: dict[str, Any] | None = None
                for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                    answer = grab(getattr(nvml, function), handle, link)
                    if isinstance(answer, dict) and answer.get("error") == "InvalidArgument":
                        break
                    answers.append(answer)
                    if link == 0 and isinstance(answer, dict) and "error" in answer:
                        no_nvlink = answer  # the GPU has no NVLink at all: record its error, not a list
                        break
                device[function] = answers if no_nvlink is None else no_nvlink
            devices.append(device)
        pairs = {
            "nvmlDeviceGetTopologyCommonAncestor": [[0 if a is b else grab(nvml.nvmlDeviceGetTopologyCommonAncestor,
                                                                           a, b) for b in handles] for a in handles],
            "nvmlDeviceGetP2PStatus": {str(i): [[0 if a is b else grab(nvml.nvmlDeviceGetP2PStatus, a, b, i)
                                                 for b in handles] for a in handles] for i in (P2P_READ, P2P_NVLINK)},
        }
        system = {"nvmlSystemGetDriverVersion": grab(nvml.nvmlSystemGetDriverVersion)}
    finally:
        nvml.nvmlShutdown()
    return {"format": RECORDING_FORMAT, "version": 1, "description": "recorded by `pase hw probe --record`",
            "system": system, "devices": devices, "pairs": pairs}


def _plain(value: Any) -> Any:
    if isinstance(value, _Struct):  # a replayed struct, recorded again
        return {name: _plain(field) for name, field in vars(value).items()}
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, tuple):
        return list(value)
    return value
