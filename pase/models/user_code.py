"""A user's model factory (``--model package.module:factory``): imported and called only because the command
line names it, and every way that user code can fail (the module does not import, has a syntax error or raises
while importing; the attribute is missing or not callable; the factory needs arguments, raises, or returns
something that is not a module) becomes one ``UserCodeError`` line naming the factory and the exception.
``PASE_DEBUG=1`` makes the CLI print the traceback behind it.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pase.errors import UserCodeError

_HOW = "give 'package.module:factory' where the module is importable (on PYTHONPATH) and factory() returns an nn.Module"
_DEBUG = "set PASE_DEBUG=1 to see the traceback"


def _exception_line(exc: BaseException) -> str:
    """``Type: message`` on one line (a SyntaxError with its file and line)."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError in {exc.filename} line {exc.lineno}: {exc.msg}"
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def load_factory(reference: str) -> Callable[[], Any]:
    """The callable ``package.module:factory`` names, checked to be callable with no arguments."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise UserCodeError(f"model factory {reference!r} is not of the form 'package.module:factory'; {_HOW}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserCodeError(f"cannot load model factory {reference!r}: {_exception_line(exc)}; {_HOW}") from exc
    except Exception as exc:  # noqa: BLE001 - any error raised by the user's module while it imports
        raise UserCodeError(f"importing {module_name!r} for model factory {reference!r} failed with "
                            f"{_exception_line(exc)} ({_DEBUG})") from exc
    if not hasattr(module, attr):
        raise UserCodeError(f"cannot load model factory {reference!r}: module {module_name!r} has no attribute "
                            f"{attr!r}; {_HOW}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UserCodeError(f"model factory {reference!r} is not callable (it is {type(factory).__name__} "
                            f"{repr(factory)[:40]}); {_HOW}")
    needed = _required_parameters(factory)
    if needed:
        raise UserCodeError(f"model factory {reference!r} needs arguments ({', '.join(needed)}) but pase calls it with "
                            "none; give a function that takes no arguments (e.g. one that calls it with yours)")
    return factory  # type: ignore[no-any-return]


def _required_parameters(factory: Callable[..., Any]) -> list[str]:
    """Parameters without defaults that a call with no arguments would miss (none when the signature is unknown)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and some C extensions have none: let the call decide
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, parameter in signature.parameters.items()
            if parameter.kind in kinds and parameter.default is inspect.Parameter.empty]


def call_factory(factory: Callable[[], Any], reference: str) -> nn.Module:
    """``factory()``, which must return an ``nn.Module``; anything it raises becomes one line."""
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - any error raised by the user's factory
        raise UserCodeError(f"model factory {reference!r} raised {_exception_line(exc)} ({_DEBUG})") from exc
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"model factory {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["call_factory", "load_factory"]
