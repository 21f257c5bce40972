"""``python -m pase`` (and ``torchrun -m pase``) runs the CLI."""
from pase.cli import run

run()
