"""Installable package for pase: a parallelization planner and runtime for diffusion UNets."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    """Single source of truth: pase/_version.py (importing pase would import torch)."""
    namespace: dict[str, str] = {}
    exec((ROOT / "pase" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


setup(
    name="pase",
    version=read_version(),
    description="Parallelization planner and runtime for diffusion models in PyTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=[f"{top}{sub}" for top in ("pase", "cost_models", "strategies")
                                    for sub in ("", ".*")]),
    package_data={"cost_models": ["data/*.json", "data/*.yaml"], "pase.train": ["digits.npz"]},
    install_requires=[
        # A range, not a pin: users bring the CUDA build that matches their driver.
        "torch>=2.5,<3",
        "networkx>=3.2",
        "numpy>=1.26",
        "nvidia-ml-py>=12.535",
        "diffusers>=0.30",
        "typer>=0.12",
        "rich>=13.7",
        "pyyaml>=6",
        "orjson>=3.9",
        "matplotlib>=3.8",  # what-if report charts
        "safetensors>=0.4",  # training checkpoints, pase sample --out
        "pillow>=9",  # folder-of-images training data
        "jsonschema>=4.18",  # plan files are checked against their declared schema
        "transformers>=4.40",  # text encoders and tokenizers of Stable Diffusion pipeline folders
        "tensorboard>=2.14",  # pase train --report-to tensorboard
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.12", "import-linter>=2.1",
                 "mypy>=1.11"],
    },
    entry_points={"console_scripts": ["pase=pase.cli:run"]},
)
