"""Retry policy shared by the flows' tasks: retry what may pass next time, not bad input."""

from __future__ import annotations

from typing import Any

from qsae.errors import QsaeError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task unless it failed on a non-transient
    ``QsaeError`` (a malformed dataset, an unknown layer, a wrong SAE: the same again)."""
    try:
        state.result()
    except QsaeError as exc:
        return exc.transient
    except BaseException:
        return True
    return True
