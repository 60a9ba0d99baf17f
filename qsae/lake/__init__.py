"""The lake: schema (defined once), store (create / validate on open / aligned writes / done
last), storage (fsspec URLs), the host side of the shard writer, result groups, the ``ds.qsae``
accessor, inspect and verify. Imports numpy/zarr/xarray/fsspec only (torch lazily in verify)."""
