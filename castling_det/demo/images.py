"""The demo's image inputs: paths, globs and folders expanded; each image read, drawn and written."""
import glob
import os
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.images import ImageReadError, read_image

__all__ = ["IMAGE_SUFFIXES", "expand_image_paths", "image_output_paths", "read_demo_image", "run_on_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_image_paths(inputs: Sequence[str]) -> List[str]:
    """The image files named by ``inputs``: files as given, folders as their image files (by
    suffix, not recursive, sorted), globs as their matches (sorted).

    Raises:
        FileNotFoundError: an input that is neither a file nor a folder and matches nothing, or a
            folder without image files.
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {item} has no images ({', '.join(IMAGE_SUFFIXES)})")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input {item} does not exist (no file, folder or glob match)")
        paths.extend(found)
    return paths


def image_output_paths(image_paths: Sequence[str], output: str) -> List[str]:
    """Where each drawn image goes: ``output`` itself for a single input when ``output`` has an
    image suffix, otherwise ``output``/the input's file name (``output`` is then a folder).

    Raises:
        ValueError: several inputs for an image file name, or two inputs with the same file name,
            which would overwrite each other.
    """
    if Path(output).suffix.lower() in IMAGE_SUFFIXES:
        if len(image_paths) > 1:
            raise ValueError(f"output {output} names one image, but there are {len(image_paths)} inputs")
        return [output]
    names = [os.path.basename(path) for path in image_paths]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"inputs share the file names {repeated}: they would overwrite each other in {output}"
        )
    return [os.path.join(output, name) for name in names]


def read_demo_image(path: str) -> np.ndarray:
    """The image in ``path`` as HWC uint8 RGB (grey, alpha and 16-bit images converted), or an
    :class:`ImageReadError` naming the file."""
    try:
        return read_image(path, "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


def run_on_images(image_paths: Sequence[str], output_paths: Sequence[str],
                  annotate: Callable[[np.ndarray], np.ndarray]) -> None:
    """Read each image, draw on it with ``annotate`` (RGB in, RGB of the same size out) and write
    it to its output path (folders created), with a progress bar."""
    for image_path, output_path in tqdm(list(zip(image_paths, output_paths)), desc="images", unit="image"):
        drawn = annotate(read_demo_image(image_path))
        os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
        Image.fromarray(drawn).save(output_path)
