"""``python -m pase.cli``: the same as ``pase`` and ``python -m pase``."""
from pase.cli import run

run()
