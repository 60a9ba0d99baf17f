"""What a job hands back: one typed result per job that renders itself.

A flow returns the job's result as it is; the CLI prints ``to_text()`` (or ``to_json()`` with
``--json``), the flow's artifact is ``to_markdown()``. sparsify's named outputs and SAELens'
eval results are the models: one object, several views, no dicts keyed by display strings.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from qsae.lake.results import jsonable  # noqa: F401 (one definition; re-exported for the results)


class Report:
    """A result that renders itself: ``to_dict`` (plain data) and ``to_text`` (the terminal) are
    each result's own; JSON and, unless a result draws its own, markdown follow from them."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_text(self) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(jsonable(self.to_dict()), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        return "```text\n" + self.to_text() + "\n```"


def fmt(x: Any, digits: int = 3) -> str:
    """A number as a person reads it: ``digits`` significant figures, thousands apart, NaN as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 10 ** -(digits - 1) or abs(x) >= 10**6):
        return f"{x:.{digits - 1}e}"
    if x == int(x) and abs(x) >= 10 ** (digits - 1):
        return f"{int(x):,}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - len(str(int(abs(x)))), 0) + 0}f}".rstrip(".")
