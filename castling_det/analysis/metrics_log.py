"""Reading Detectron2's ``metrics.json``: one JSON record per line, as its ``JSONWriter`` writes it."""
import json
import logging
import math
import os
from typing import Dict, List, Tuple

__all__ = ["block_summary", "metric_series", "read_metrics"]

logger = logging.getLogger(__name__)


def read_metrics(path: str) -> List[Dict]:
    """The records of ``path`` (a ``metrics.json``, or an output folder holding one), one per
    iteration, sorted by iteration. A run resumed in the same folder appends the iterations it
    repeats, so the last record of each iteration is kept. Lines that are not a JSON object with
    an integer ``iteration`` are skipped, with one counted warning.

    Raises:
        FileNotFoundError: no ``metrics.json`` at ``path``.
    """
    is_file = os.path.isfile(path) or str(path).endswith(".json")
    file_name = path if is_file else os.path.join(path, "metrics.json")
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"metrics file {file_name} does not exist")
    by_iteration, malformed = {}, []
    with open(file_name) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # Python's json reads the NaN that JSONWriter writes
                iteration = record["iteration"]
            except (json.JSONDecodeError, TypeError, KeyError):
                malformed.append(line_number)
                continue
            if not isinstance(iteration, int):
                malformed.append(line_number)
                continue
            by_iteration[iteration] = record
    if malformed:
        logger.warning(
            "%s: skipped %d malformed line(s) (line %s)", file_name, len(malformed),
            ", ".join(map(str, malformed[:5])) + (", ..." if len(malformed) > 5 else ""),
        )
    return [by_iteration[i] for i in sorted(by_iteration)]


def metric_series(records: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    """The iterations and values of ``key`` in the records that hold it as a finite number."""
    points = [
        (record["iteration"], float(record[key])) for record in records
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
    ]
    return [i for i, _ in points], [v for _, v in points]


def block_summary(records: List[Dict], prefix: str) -> Tuple[List[int], List[float], List[float]]:
    """The iterations, and the mean and maximum over blocks, of the per-block metrics named
    ``prefix`` + block (e.g. ``branch/mass/`` for ``branch/mass/block0``, ``branch/mass/block1``,
    ...), over the records that hold any."""
    iterations, means, maxima = [], [], []
    for record in records:
        values = [
            float(value) for key, value in record.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and math.isfinite(value)
        ]
        if values:
            iterations.append(record["iteration"])
            means.append(sum(values) / len(values))
            maxima.append(max(values))
    return iterations, means, maxima
