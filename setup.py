"""castling_det: Castling-ViT backbones for Detectron2.

Detectron2 is deliberately not listed in install_requires: it is not on PyPI, so pip cannot
resolve it. Install it first (see README.md, "Installing Detectron2").
"""
from setuptools import find_packages, setup

setup(
    name="castling_det",
    version="0.1.0",
    description="Castling-ViT (linear-angular attention) backbones for Detectron2",
    packages=find_packages(include=["castling_det", "castling_det.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision", "fvcore", "iopath"],
)
