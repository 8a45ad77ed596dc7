"""Install the pure-Python Detectron2 into the running interpreter's site-packages.

Detectron2 is not on PyPI. PyPI's ``sal-detectron2==0.7.2`` wheel carries upstream Detectron2
(April 2024) built for CPython 3.10; its Python code runs unchanged on 3.11 without the compiled
``_C`` extension (needed only for rotated boxes, deformable conv and the fast COCO evaluator).
pip refuses the wheel's cp310 tag and the wheel also ships an unrelated top-level ``tools``
package, so this script downloads it and copies only its ``detectron2/`` folder.

Where ``import detectron2`` already works (e.g. built from source), nothing is changed.

Usage: python tools/install_detectron2.py
"""
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sal-detectron2==0.7.2"


def main() -> int:
    if importlib.util.find_spec("detectron2") is not None:
        print("detectron2 is already importable; leaving it alone.")
        return 0
    site_packages = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.10", "--platform", "manylinux2014_x86_64",
             "--dest", tmp, WHEEL],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {WHEEL} in {tmp}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            # The compiled extension targets CPython 3.10 and cannot load here: leave it out.
            members = [
                m for m in zf.namelist()
                if m.startswith("detectron2/") and not m.endswith((".so", ".pyd"))
            ]
            zf.extractall(site_packages, members=members)
    print(f"installed detectron2 ({len(members)} files) into {site_packages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
