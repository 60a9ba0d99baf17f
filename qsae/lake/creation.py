"""The creation protocol of a store: its identity is written first under a ``creating`` mark, and
a creation that died is told from one in progress (by the newest write anywhere in the store)
and re-created only when that is safe; two creators end with one store."""

from __future__ import annotations

import os
import time
from typing import Any

import zarr

from qsae.errors import ConcurrentCreationError, ConfigMismatchError, IncompleteStoreError
from qsae.lake.spec import identity_diff
from qsae.lake.storage import StoreRef
from qsae.lake.validate import CREATING


def creation_stale_seconds() -> float:
    """How long a store may stay marked as being created before it counts as abandoned."""
    return float(os.environ.get("QSAE_CREATE_STALE_S", "120"))


def _raw_attrs(ref: StoreRef) -> dict[str, Any] | None:
    """The root group's attributes as stored, None when there is no readable group (yet)."""
    try:
        g = zarr.open_group(store=ref.zarr_store(read_only=True), mode="r", zarr_format=3, use_consolidated=False)
        return dict(g.attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError, OSError):
        return None  # absent, or another writer is half-way through writing it


def _creation_state(ref: StoreRef) -> dict[str, Any] | None:
    """None for a complete store; else what is known of its unfinished creation (a ``creating``
    mark, or, from qsae before 0.2, a group without ``schema_version``)."""
    attrs = _raw_attrs(ref)
    if attrs is None:
        path = ref.local_path  # a directory claimed by mkdir whose group is not written yet
        if path is not None and path.is_dir() and not any(path.iterdir()):
            return {"started": path.stat().st_mtime, "identity": None}
        return None
    if CREATING in attrs:
        return {"started": float(attrs[CREATING].get("started", 0)), "identity": attrs.get("config")}
    if "schema_version" not in attrs:  # qsae before 0.2 wrote the identity last; or a write in progress
        return {"started": _root_mtime(ref), "identity": None}
    return None


def _root_mtime(ref: StoreRef) -> float:
    """When the root group's metadata was last written (0 when it cannot be told): an
    incomplete store counts as abandoned only once this is older than the stale time."""
    try:
        fs, root = ref.fs()
        info = fs.info(f"{root.rstrip('/')}/zarr.json")
    except Exception:  # noqa: BLE001 - unknown age: treated as old, as before the mark existed
        return 0.0
    when = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(when, "timestamp"):
        return float(when.timestamp())
    return float(when or 0.0)


def _newest_local_write(ref: StoreRef) -> float:
    """The newest mtime of a local store's folder, its entries and theirs (0 for a remote store)."""
    root = ref.local_path
    if root is None:
        return 0.0
    newest = 0.0
    try:
        newest = root.stat().st_mtime
        with os.scandir(root) as entries:
            for entry in entries:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                if entry.is_dir(follow_symlinks=False):
                    with os.scandir(entry.path) as inner:
                        for sub in inner:
                            newest = max(newest, sub.stat(follow_symlinks=False).st_mtime)
    except OSError:  # removed while we looked: then it is being written or deleted, not stale
        return time.time()
    return newest


def _busy_message(ref: StoreRef) -> str:
    state = _creation_state(ref) or {}
    ago = time.time() - state["started"] if state.get("started") else None
    when = f" (started {ago:.0f} s ago)" if ago is not None else ""
    return (f"another capture is creating the store at {ref.url} right now{when}: this one stops without touching "
            "it; run it again in a minute (it resumes that store, or re-creates it if that creation died)")


def _reclaim_incomplete(ref: StoreRef, spec: Any) -> None:
    """Remove a store whose creation never finished, when that is safe: nothing done in it, the
    same identity (else ConfigMismatchError: the real reason), and no creation in progress
    (else ConcurrentCreationError)."""
    state = _creation_state(ref) or {}
    identity = state.get("identity")
    if identity is not None:
        diff = identity_diff(identity, spec.identity())
        if diff:
            lines = "\n".join(f"  {k}: store has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
            raise ConfigMismatchError(f"the store at {ref.url} is being created with a different config:\n{lines}\n"
                                      "Use another --store.")
    # Its age is from the newest write anywhere in it, not only from the mark: a creator still
    # writing arrays is never taken for an abandoned one, whatever the mark or a clock says.
    age = time.time() - max(float(state.get("started") or 0), _newest_local_write(ref))
    if age < creation_stale_seconds():
        raise ConcurrentCreationError(_busy_message(ref))
    fs, root = ref.fs()
    if fs.exists(f"{root.rstrip('/')}/done") and [p for p in fs.find(f"{root.rstrip('/')}/done")
                                                  if not p.endswith("zarr.json")]:
        raise IncompleteStoreError(f"{ref.url} has done questions but an incomplete identity: refusing to touch it; "
                                   "move it aside or delete it by hand")
    ref.delete()
