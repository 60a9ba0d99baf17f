"""qsae's log lines in the Prefect run they happen in, by default.

The jobs log through stdlib loggers under ``qsae`` (no Prefect in ``qsae/``). Prefect forwards
a library's loggers only when ``PREFECT_LOGGING_EXTRA_LOGGERS`` names them, read once when
Prefect is imported, so a user who did not set it saw none of the p-values and group sizes
in the run's logs. Every flow module calls ``forward_qsae_logs()`` at import: records of the
``qsae`` logger made inside a flow or task run go to that run's logs; outside a run (a notebook,
``--no-prefect``) they go nowhere extra and warn about nothing.
"""

from __future__ import annotations

import logging

QSAE_LOGGER = "qsae"


class RunLogsHandler(logging.Handler):
    """Hands a record to Prefect's API log handlers when it was made inside a flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        for handler in logging.getLogger("prefect.extra").handlers:  # Prefect's own: the API handler
            if record.levelno >= handler.level:
                handler.handle(record)


def forward_qsae_logs() -> None:
    """Attach ``RunLogsHandler`` to the ``qsae`` logger once (not when PREFECT_LOGGING_EXTRA_LOGGERS
    already attached Prefect's handler: the lines would be recorded twice), and let INFO through."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(QSAE_LOGGER)
    if logger.level == logging.NOTSET:  # a library leaves it unset: the root's WARNING would drop INFO
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, (RunLogsHandler, APILogHandler)) for h in logger.handlers):
        logger.addHandler(RunLogsHandler())
