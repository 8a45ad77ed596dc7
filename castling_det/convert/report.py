"""The report of a weight conversion: which keys were matched, converted, new and dropped."""
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

from tabulate import tabulate

__all__ = ["ConversionReport"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass
class ConversionReport:
    """What a conversion did to every key.

    Target keys (``matched``, ``converted``, ``initialised``, ``left_to_model``) are the
    detector's (``backbone.net.blocks.0.norm1.weight``); dropped keys are the source file's own.

    Attributes:
        source_path, source_format: the file and its format (``timm``, ``mae``, ``detectron2``).
        matched: ViT keys whose tensor is the source's, unchanged.
        converted: ViT key -> what was done to the source tensor (resized, slots added/dropped).
        initialised: ViT key the source lacks -> how it was initialised (written to the output).
        left_to_model: the detector's other keys (pyramid, heads): not written, so they keep the
            model's own initialisation when the output is loaded.
        dropped: source ViT key -> why it has no place in the target.
        dropped_outside: the file's tensors outside its ViT (a detector's pyramid and heads).
        warnings: one per dropped key that changes what the converted blocks compute.
    """

    source_path: str
    source_format: str
    matched: List[str] = field(default_factory=list)
    converted: Dict[str, str] = field(default_factory=dict)
    initialised: Dict[str, str] = field(default_factory=dict)
    left_to_model: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    dropped_outside: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"{self.source_path} ({self.source_format}): {len(self.matched)} matched, "
            f"{len(self.converted)} converted, "
            f"{len(self.initialised) + len(self.left_to_model)} new ({len(self.initialised)} "
            f"initialised and written, {len(self.left_to_model)} left to the model's init), "
            f"{len(self.dropped) + len(self.dropped_outside)} dropped ({len(self.dropped_outside)} "
            "outside the source's ViT)"
        )

    def table(self) -> str:
        """Every key, grouped over block indices (``blocks.{0-11}.norm1.weight``), as a table."""
        rows = []
        sections = (
            ("matched", [(key, "copied as is") for key in self.matched]),
            ("converted", self.converted.items()),
            ("new", self.initialised.items()),
            ("new", [(_module_of(key), "not written: the model's own init") for key in self.left_to_model]),
            ("dropped", self.dropped.items()),
            ("dropped", [(_module_of(key), "outside the source's ViT") for key in self.dropped_outside]),
        )
        for status, entries in sections:
            for pattern, count, note in _group(entries):
                rows.append((status, pattern, count, note))
        return tabulate(rows, headers=("status", "keys", "count", "how / why"), tablefmt="github")

    def format(self) -> str:
        """The table, the warnings and the summary line, as the CLI prints them."""
        lines = [self.table(), ""]
        for pattern, count, _ in _group((warning, "") for warning in self.warnings):
            lines.append(f"WARNING: {pattern} (x{count})")
        lines.append(self.summary())
        return "\n".join(lines)


def _group(entries: Iterable[Tuple[str, str]]) -> List[Tuple[str, int, str]]:
    """(key, note) pairs to (pattern, count, note), keys that differ only in their numeric path
    components (block indices) sharing a pattern; in the order the first key of each appears."""
    groups = defaultdict(list)
    for key, note in entries:
        groups[(_INDEX.sub("{}", key), note)].append([int(i) for i in _INDEX.findall(key)])
    rows = []
    for (template, note), indices in groups.items():
        ranges = [_span(sorted({found[pos] for found in indices})) for pos in range(template.count("{}"))]
        rows.append((template.format(*ranges), len(indices), note))
    return rows


def _module_of(key: str) -> str:
    """``roi_heads.box_head.fc1.weight`` -> ``roi_heads.box_head.*``: a detector's parts around
    the ViT are listed by module, not by tensor."""
    return ".".join(key.split(".")[:2]) + ".*"


def _span(values: List[int]) -> str:
    """``[0, 1, 2]`` -> ``"0"`` alone, ``"{0-2}"`` contiguous, ``"{0,2,5}"`` otherwise."""
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"
