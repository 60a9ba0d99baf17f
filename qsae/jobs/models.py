"""The process-wide models the jobs' steps share: one load per (model, revision, device, dtype),
made once even when mapped tasks start together on threads (two loads at once race inside
transformers), each with the lock that serialises its use (hooks are per module: two steps
steering or capturing on one model at once would see each other's hooks)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from qsae.lm.models import LoadedModel, load_model

_LOAD = threading.Lock()
_MODELS: OrderedDict[tuple, Shared] = OrderedDict()
KEEP = 2  # models kept loaded at once (the oldest is dropped)


@dataclass
class Shared:
    lm: LoadedModel
    lock: threading.Lock


def shared_model(name: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False) -> Shared:
    """The loaded model for these settings, loaded on first use (under a lock: once)."""
    key = (name, revision, device, dtype, trust_remote_code)
    with _LOAD:
        if key not in _MODELS:
            _MODELS[key] = Shared(load_model(name, revision=revision, device=device, dtype=dtype,
                                             trust_remote_code=trust_remote_code), threading.Lock())
            while len(_MODELS) > KEEP:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(key)
        return _MODELS[key]
