"""Reading a record's image as 8-bit pixels in the config's format, or failing with its name.

Detectron2's ``read_image`` lets PIL convert every image to RGB, which clips 16-bit grey levels at
255 (a 16-bit PNG comes out nearly white), and lets a missing, corrupt or truncated file fail deep
inside PIL with no word of which record it belongs to.
"""
from typing import Dict, Sequence

import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "read_image", "read_record_image"]

# Integer grey-level modes wider than 8 bits ("I" is how PIL holds 32-bit and some 16-bit files).
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PEAK_16_BIT = 65535


class ImageReadError(OSError):
    """An image of a data set record could not be read (missing, corrupt or unsupported)."""


def _to_8_bit(image: Image.Image) -> Image.Image:
    """``image`` with wide grey levels scaled from 0..65535 to 0..255; other modes as they are."""
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels (PIL mode 'F') are not supported")
    if image.mode not in _WIDE_GREY_MODES:
        return image
    grey = np.asarray(image)
    if grey.size and (grey.min() < 0 or grey.max() > _PEAK_16_BIT):
        raise ValueError(
            f"grey levels {grey.min()}..{grey.max()} (PIL mode {image.mode!r}) are outside the "
            f"16-bit range 0..{_PEAK_16_BIT}"
        )
    return Image.fromarray(np.round(grey * (255.0 / _PEAK_16_BIT)).astype(np.uint8))


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation tag, or as it is when its EXIF block is broken
    (a bad tag should not cost a readable image; see Detectron2 issue #1885)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def read_image(file_name: str, image_format: str) -> np.ndarray:
    """The image in ``file_name`` as an HWC uint8 array in ``image_format`` ("RGB", "BGR", ...),
    turned upright by its EXIF orientation; grey, palette and alpha images become 3 channels
    (alpha is dropped), 16-bit grey is scaled to 8 bits."""
    with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
        image.load()  # decode now, inside the file's "with": a truncated file fails here
        return convert_PIL_to_numpy(_to_8_bit(_upright(image)), image_format)


def read_record_image(record: Dict, image_format: str, dataset_names: Sequence[str] = ()) -> np.ndarray:
    """:func:`read_image` of ``record["file_name"]``; on failure an :class:`ImageReadError` that
    names the file, the record's image id and, when given, its data set(s), with PIL's reason."""
    file_name = record["file_name"]
    try:
        return read_image(file_name, image_format)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        where = f"image id {record.get('image_id')!r}"
        if dataset_names:
            where += " of data set " + " or ".join(repr(name) for name in dataset_names)
        # "from None": the reason is in the message; PIL's own stack would only bury it.
        raise ImageReadError(
            f"cannot read image {file_name} ({where}): {type(err).__name__}: {err}"
        ) from None
