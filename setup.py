"""castling_det: Castling-ViT backbones for Detectron2.

Detectron2 is deliberately not listed in install_requires: it is not on PyPI, so pip cannot
resolve it. Install it first (see README.md, "Installing Detectron2"); ``import castling_det``
says so, naming what it needs, when it is missing or too old.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# One version source: castling_det/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "castling_det/__init__.py").read_text(), re.M).group(1)

COMMANDS = {
    "castling-train": "train_net",
    "castling-lazyconfig-train": "lazyconfig_train_net",
    "castling-demo": "demo",
    "castling-export": "export_model",
    "castling-convert-weights": "convert_weights",
    "castling-make-shapes-dataset": "make_shapes_dataset",
    "castling-plot-metrics": "plot_metrics",
    "castling-analyze-model": "analyze_model",
    "castling-model-zoo": "model_zoo",
    "castling-benchmark": "benchmark",
    "castling-profile-attention": "profile_attention",
    "castling-profile-vit": "profile_vit",
    "castling-benchmark-accuracy": "benchmark_accuracy",  # needs a checkout (tools/train_net.py, configs/)
}

setup(
    name="castling_det",
    version=VERSION,
    description="Castling-ViT (linear-angular attention) backbones for Detectron2",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["castling_det", "castling_det.*"]),
    # The configs (castling_det/model_zoo/configs links to the repository's configs/ in a checkout;
    # a wheel holds copies), found with castling_det.model_zoo.get_config_file.
    package_data={
        "castling_det.model_zoo": ["configs/*.yaml", "configs/*/*.yaml", "configs/lazy/*.py", "configs/lazy/*/*.py"],
        # The native CPU attention operator, compiled on first use (castling_det/modeling/native_attention.py).
        "castling_det.modeling": ["csrc/*.cpp"],
    },
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore",
        "iopath",
        "numpy",
        "Pillow",
        "pycocotools",
        "tabulate",
        "tqdm",
        "omegaconf>=2.1",
    ],
    extras_require={
        # castling-demo; matplotlib also for castling-plot-metrics, castling-benchmark and castling-benchmark-accuracy
        "demo": ["opencv-python-headless", "matplotlib"],
        "convert": ["timm"],  # reading timm checkpoints in tools/convert_weights.py
        "export": ["onnx", "onnxruntime"],  # tools/export_model.py --format onnx
        "test": ["pytest", "timm", "onnx", "onnxruntime", "opencv-python-headless", "matplotlib", "tensorboard"],
    },
    entry_points={
        "console_scripts": [f"{command} = castling_det.commands.{module}:run" for command, module in COMMANDS.items()]
    },
)
