"""User-facing errors: each names what is wrong and what to do about it.

The CLI prints these as one short message (no traceback); anything else that escapes is a
bug in pase and keeps its traceback.
"""
from __future__ import annotations


class PaseError(Exception):
    """An error caused by input the user can fix; the message says how."""


class UnknownModelError(PaseError):
    """A model name that is neither in the zoo nor a ``module:factory`` reference."""


class InputShapeError(PaseError):
    """An example input whose shape does not match what the model expects."""


class GraphCaptureError(PaseError):
    """No capture front end (meta_trace, torch.export, torch.fx.symbolic_trace) could capture the model."""


class UserCodeError(PaseError):
    """A user's model factory that cannot be imported or called, or that raised: named with the exception."""
