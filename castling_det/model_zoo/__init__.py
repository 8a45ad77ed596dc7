"""castling_det's configs, found through the package, as Detectron2's ``model_zoo`` finds its own.

The configs ship inside the package (``castling_det/model_zoo/configs``; in a checkout, a link to
the repository's ``configs/``), so a project that ``pip install``-ed castling_det can use them::

    from castling_det import model_zoo
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_castling_vit_s_fpn_3x.yaml")
    lazy = model_zoo.get_config("lazy/mask_rcnn_castling_vit_b_100ep.py")

No pretrained Castling-ViT weights exist yet, so there is no ``get_checkpoint_url``.
"""
from pathlib import Path
from typing import List

__all__ = ["get_config", "get_config_file", "list_configs"]

_CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def list_configs() -> List[str]:
    """Every config's path relative to the config root, sorted (the LazyConfig recipes' shared
    parts under ``lazy/common`` and ``lazy/models`` left out)."""
    paths = [*_CONFIG_ROOT.rglob("*.yaml"), *_CONFIG_ROOT.glob("lazy/*.py")]
    return sorted(str(path.relative_to(_CONFIG_ROOT)) for path in paths)


def get_config_file(config_path: str) -> str:
    """The absolute path of a config shipped with castling_det.

    Args:
        config_path: relative to the config root, e.g.
            ``"COCO-Detection/faster_rcnn_castling_vit_ti_fpn_3x.yaml"``.

    Raises:
        FileNotFoundError: naming ``config_path`` and where it was looked for.
    """
    path = _CONFIG_ROOT / config_path
    if not path.is_file():
        raise FileNotFoundError(
            f"castling_det has no config {config_path!r} under {_CONFIG_ROOT}; "
            "castling_det.model_zoo.list_configs() lists them"
        )
    return str(path)


def get_config(config_path: str):
    """A config shipped with castling_det: a yacs ``CfgNode`` (Detectron2's defaults, castling_det's
    keys and the file; not frozen) for a ``.yaml``, a LazyConfig ``DictConfig`` for a ``.py``."""
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from ..config import load_castling_config

    return load_castling_config(path)
