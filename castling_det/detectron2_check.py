"""A clear error, at ``import castling_det``, when Detectron2 is missing or too old.

castling_det needs Detectron2's ViTDet parts, which came after its last release (0.6, November
2021) on its main branch: ``SimpleFeaturePyramid`` and the ViT utilities in
``detectron2.modeling.backbone``, and ``ImageList.from_tensors(padding_constraints=...)``.
Detectron2's own version string still says 0.6 on main, so the check looks for these features.
"""
import importlib
import inspect

__all__ = ["REQUIRED_DETECTRON2", "check_detectron2"]

REQUIRED_DETECTRON2 = (
    "Detectron2 from its main branch of 2023 or later (release 0.6 is too old); see README.md, "
    "'Installing Detectron2' (`python tools/install_detectron2.py` installs a suitable one)"
)


def _missing_features() -> list:
    """The ViTDet-era Detectron2 features that the installed Detectron2 lacks."""
    backbone = importlib.import_module("detectron2.modeling.backbone")
    missing = [name for name in ("SimpleFeaturePyramid", "utils") if not hasattr(backbone, name)]
    from detectron2.structures import ImageList

    if "padding_constraints" not in inspect.signature(ImageList.from_tensors).parameters:
        missing.append("ImageList.from_tensors(padding_constraints=...)")
    return missing


def check_detectron2() -> None:
    """Raise ImportError, naming what is needed and what was found, unless an importable
    Detectron2 has every feature castling_det uses."""
    try:
        detectron2 = importlib.import_module("detectron2")
    except ImportError as error:
        raise ImportError(f"castling_det needs {REQUIRED_DETECTRON2}; detectron2 is not installed") from error
    missing = _missing_features()
    if missing:
        found = f"detectron2 {getattr(detectron2, '__version__', '?')} at {detectron2.__file__}"
        raise ImportError(f"castling_det needs {REQUIRED_DETECTRON2}; {found} lacks {', '.join(missing)}")
