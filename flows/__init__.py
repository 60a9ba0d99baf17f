"""Prefect flows: thin orchestration (retries, mapping, artifacts) around ``qsae`` functions.

The jobs log through stdlib loggers under ``qsae``; deployments forward them into each run's
logs (``PREFECT_LOGGING_EXTRA_LOGGERS=qsae`` in ``prefect.yaml``), which needs the logger to
pass INFO records (a library leaves its level unset, so the root's WARNING would drop them).
"""

import logging

if logging.getLogger("qsae").level == logging.NOTSET:
    logging.getLogger("qsae").setLevel(logging.INFO)
