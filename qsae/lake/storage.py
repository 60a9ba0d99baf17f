"""Where lakes live: fsspec URLs turned into zarr stores (local path, memory://, s3://, ...).

A URL without a scheme is a local path. S3 settings come from the caller's
``storage_options`` or, when none are given, from the environment (see
``qsae/data/profiles.yaml``, shipped with the package; ``$QSAE_PROFILES`` or a project's own
``storage/profiles.yaml`` in the working directory take precedence); credentials never come
from the repository.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr
import zarr.storage


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def local_path(url: str) -> Path | None:
    """The filesystem path of a local store URL, or None for remote ones."""
    scheme = _scheme(url)
    if scheme != "file":
        return None
    return Path(url.split("://", 1)[1] if "://" in url else url).expanduser().resolve()


def env_storage_options(url: str) -> dict[str, Any]:
    """Storage options read from the environment for a URL's scheme (empty if none apply).

    For s3:// the endpoint comes from ``QSAE_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``) and
    credentials from the usual AWS variables, which s3fs/botocore read themselves.
    """
    if _scheme(url) not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("QSAE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def resolve_storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's storage options if given, else those from the environment."""
    return dict(storage_options) if storage_options else env_storage_options(url)


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store object for a URL: LocalStore for paths, FsspecStore otherwise."""
    path = local_path(url)
    if path is not None:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(path, read_only=read_only)
    opts = resolve_storage_options(url, storage_options)
    return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def xarray_target(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, dict]:
    """(url, storage_options) to hand to ``xarray.open_zarr`` for the same store."""
    path = local_path(url)
    if path is not None:
        return str(path), {}
    return url, resolve_storage_options(url, storage_options)


@dataclass(frozen=True)
class StoreRef:
    """One store, one handle: its URL and fsspec options, and what callers do with them (the
    zarr store, xarray's target, exists/delete, paths beside it). pangeo-forge's
    ``FSSpecTarget`` is the model. Configs keep plain ``store``/``storage_options`` fields
    (Prefect parameters) and hand out ``cfg.ref``."""

    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def of(cls, target: str | StoreRef, storage_options: Mapping[str, Any] | None = None) -> StoreRef:
        """A ref from a URL (with options) or an existing ref (options given here must agree)."""
        if isinstance(target, StoreRef):
            if storage_options and dict(storage_options) != dict(target.storage_options or {}):
                raise ValueError(f"{target.url}: storage_options given twice, and they differ")
            return target
        return cls(str(target), dict(storage_options) if storage_options else None)

    def __str__(self) -> str:
        return self.url

    @property
    def local_path(self) -> Path | None:
        """The filesystem path of a local store, None for a remote one."""
        return local_path(self.url)

    @property
    def absolute(self) -> str:
        """The absolute path of a local store, else the URL (what logs and results name)."""
        path = self.local_path
        return str(path) if path is not None else self.url

    @property
    def options(self) -> dict[str, Any]:
        """The fsspec options in effect: the given ones, else those from the environment."""
        return {} if self.local_path is not None else resolve_storage_options(self.url, self.storage_options)

    def zarr_store(self, read_only: bool = False):
        return zarr_store(self.url, self.storage_options, read_only=read_only)

    def xarray_target(self) -> tuple[str, dict]:
        """(url, storage_options) for ``xarray.open_zarr``/``to_zarr``."""
        return xarray_target(self.url, self.storage_options)

    def fs(self):
        """(fsspec filesystem, root path) of the store."""
        import fsspec

        return fsspec.core.url_to_fs(self.absolute, **self.options)

    def exists(self) -> bool:
        fs, root = self.fs()
        return bool(fs.exists(root))

    def delete(self) -> None:
        """Remove the whole store (nothing if there is none)."""
        path = self.local_path
        if path is not None:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            return
        fs, root = self.fs()
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def __truediv__(self, key: str) -> StoreRef:
        """``key`` inside this store or folder, with the same options (pangeo-forge's
        ``FSSpecTarget / "x"``); ``str()`` of it is its URL/path."""
        return StoreRef(f"{self.absolute.rstrip('/')}/{key}", self.storage_options)

    @property
    def figures(self) -> StoreRef:
        """The folder beside the store that holds its figures (``<store>.figures``): zarr warns
        about foreign objects inside its hierarchy, and a PNG next to the lake is easy to find."""
        return StoreRef(self.absolute.rstrip("/") + ".figures", self.storage_options)


def _expand(value: Any) -> Any:
    """Replace ${VAR} by the environment's value; keys whose value ends up empty are dropped."""
    if isinstance(value, str):
        return os.path.expandvars(value) if "$" in value else value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = _expand(v)
            if v in ("", None, {}) or (isinstance(v, str) and "${" in v):
                continue
            out[k] = v
        return out
    return value


def profiles_path() -> Path:
    """Where the storage profiles are read: ``$QSAE_PROFILES``, else ``storage/profiles.yaml`` in
    the working directory if there is one, else the package's own ``qsae/data/profiles.yaml``
    (so an installed qsae finds them as a source checkout does)."""
    if os.environ.get("QSAE_PROFILES"):
        return Path(os.environ["QSAE_PROFILES"])
    local = Path("storage") / "profiles.yaml"
    if local.is_file():
        return local
    return Path(__file__).resolve().parents[1] / "data" / "profiles.yaml"


def load_profile(name: str, path: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """(root URL, storage_options) of a profile in the profiles file (``profiles_path()``).

    ``${VAR}`` values come from the environment at call time; unset ones are dropped, so an
    unset endpoint falls back to AWS's default and unset credentials to botocore's chain.
    """
    import yaml

    path = Path(path) if path else profiles_path()
    profiles = yaml.safe_load(Path(path).read_text()) or {}
    if name not in profiles:
        raise KeyError(f"no storage profile {name!r} in {path} (profiles: {sorted(profiles)})")
    prof = profiles[name]
    root = os.path.expandvars(prof.get("root", ""))
    if "${" in root or "$" in root:
        raise ValueError(f"storage profile {name!r}: root {prof.get('root')!r} needs an environment variable that is unset")
    return root, _expand(prof.get("storage_options") or {})
