"""Resolve S3 credentials held in Prefect Secret blocks into fsspec storage options.

``storage_options`` may name blocks instead of holding secrets: ``{"key_block": "s3-key",
"secret_block": "s3-secret", ...}``; the flow replaces them by the blocks' values at run
time, so neither the repository nor the flow parameters ever contain the secret itself.
"""

from __future__ import annotations

from typing import Any

BLOCK_KEYS = {"key_block": "key", "secret_block": "secret", "token_block": "token"}


def resolve_secret_blocks(storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    if not storage_options or not any(k in storage_options for k in BLOCK_KEYS):
        return storage_options
    from prefect.blocks.system import Secret

    out = {k: v for k, v in storage_options.items() if k not in BLOCK_KEYS}
    for block_key, option in BLOCK_KEYS.items():
        if block_key in storage_options:
            out[option] = Secret.load(storage_options[block_key]).get()
    return out
