"""What the CLI does around a job: the one way a command runs it (checks, then its Prefect flow or
in-process, then the result rendered), and the console plumbing that makes a Prefect run read
like an in-process one (Prefect's lines on stdout, qsae's errors one line each, ``--json``
alone on stdout, a lost Prefect server ending the command in one line)."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from qsae.jobs.preflight import preflight  # torch-free

TIMES: dict[str, float] = {}  # stage -> seconds, printed at the end of the demo


class _ShortQsaeErrors(logging.Formatter):
    """Prefect's console lines as they are, except a record carrying one of qsae's own errors:
    one line (which run failed, and with which error), without the traceback. The run's logs
    in the UI keep the whole record; the command's last lines give the reason once."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        from qsae.errors import QsaeError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, QsaeError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "args": (),
                                            "msg": f"failed: {type(exc).__name__}: {first[:160]}"})
        elif "\\n" in (msg := record.getMessage()) and msg.startswith("Finished in state Failed"):
            # a failed state's repr carries the whole multi-line reason: its first line says enough here
            record = logging.makeLogRecord({**record.__dict__, "args": (), "msg": msg.split("\\n")[0] + " ...)"})
        return self.inner.format(record)


@contextmanager
def _prefect_console_on_stdout() -> Iterator[None]:
    """Prefect's console handler writes to stdout for the command's duration (stderr is for the
    error alone, as with --no-prefect), with qsae's errors one line each (``_ShortQsaeErrors``)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    saved = []
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and not isinstance(h.formatter, _ShortQsaeErrors):
                saved.append((h, h.formatter, h.console.file))
                h.setFormatter(_ShortQsaeErrors(h.formatter))
                h.console.file = None  # rich then writes to whatever sys.stdout is at each line
    try:
        yield
    finally:
        for h, formatter, file in saved:
            h.setFormatter(formatter)
            h.console.file = file


LOST_SERVER_EXIT = 3  # the exit status of a run whose Prefect server went away (resumable)
LOST_SERVER_GRACE_S = 25.0  # how long the step at work may take to reach a safe point


def _server_lost(describe: Callable[[], str] | None) -> None:
    """The Prefect API is gone: the step at work finishes (a shard is written whole, or not
    started), then the command ends with one line and a status that says so, instead of
    retrying the API for minutes and a long traceback. Runs in the watcher thread."""
    from qsae.jobs import interrupt

    interrupt.request_stop("the Prefect server stopped")
    idle = interrupt.wait_idle(LOST_SERVER_GRACE_S)
    try:
        state = describe() if describe else ""
    except Exception:  # noqa: BLE001 - the line must come out whatever the store says
        state = ""
    line = "qsae: the Prefect server stopped" + (f"; {state}" if state else "") + "; rerun the same command to resume"
    if not idle:
        line += f" (a step was still at work after {LOST_SERVER_GRACE_S:.0f} s: what it had not marked done is redone)"
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    print(line, file=sys.__stderr__, flush=True)
    os._exit(LOST_SERVER_EXIT)


def lake_state_line(cfg: Any) -> str:
    """'the lake holds N of M questions' for a config naming a lake (empty if it has none yet)."""
    from qsae.lake.store import Lake

    ref = getattr(cfg, "ref", None)
    if ref is None:
        return ""
    lake = Lake.open(ref)
    return f"the lake holds {int(lake.done_mask().sum()):,} of {lake.n_units:,} {lake.schema.unit}s"


@contextmanager
def _prefect(server=None, describe: Callable[[], str] | None = None) -> Iterator[str]:
    """A Prefect API for the flow: PREFECT_API_URL if set, else a temporary server of our own
    (``server``, if the command launched it early to overlap its start with other work). If the
    API goes away during the run, ``_server_lost`` ends the command (``describe``: its state)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.server import prefect_api

    qsae_logger = logging.getLogger("qsae")
    plain = [h for h in qsae_logger.handlers if getattr(h, "_qsae_cli", False)]
    for h in plain:  # inside a flow run Prefect prints (and records) the jobs' lines itself
        qsae_logger.removeHandler(h)
    t0 = time.perf_counter()
    try:
        with _prefect_console_on_stdout(), prefect_api(typer.echo, server=server,
                                                       on_lost=lambda: _server_lost(describe)) as url:
            TIMES["Prefect server start (wait)"] = time.perf_counter() - t0
            yield url
    finally:
        for h in plain:
            qsae_logger.addHandler(h)


def _load(path: str) -> Any:
    """``module:name`` imported when called: the checks run before torch and Prefect are imported."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_job(cfg: Any, flow: str, local: str, prefect: bool, as_json: bool, server: Any = None,
            show: Callable[[Any], None] | None = None, **flow_kwargs: Any) -> Any:
    """The one way a command runs a job: cheap checks first, then the job through its Prefect flow
    (``flow``, which returns the job's typed result as it is; ``server``: one the command
    launched early) or in-process (``local``: ``module:function`` of the config, given a
    progress bar when it takes one); then the result, rendered (``show``: another rendering
    than its summary), and last the line that says how to see its Prefect run again."""
    out = sys.stdout
    with _human_lines_to_stderr(as_json):  # --json: stdout holds the JSON alone
        preflight(cfg)
        t0 = time.perf_counter()
        if not prefect:
            fn = _load(local)
            result = fn(cfg, progress=True) if "progress" in inspect.signature(fn).parameters else fn(cfg)
            TIMES[f"{flow.rsplit(':', 1)[-1].removesuffix('_flow')} (in-process)"] = time.perf_counter() - t0
            see_again = None
        else:
            from flows.server import configured_api_url

            flow_fn, temporary = _load(flow), server is not None or configured_api_url() is None
            with _prefect(server, describe=lambda: lake_state_line(cfg)) as url:
                t0 = time.perf_counter()
                state = flow_fn(config=cfg, return_state=True, **flow_kwargs)
                TIMES[f"{flow.rsplit(':', 1)[-1].removesuffix('_flow')} (Prefect flow)"] = time.perf_counter() - t0
            see_again = run_link(url, state.state_details.flow_run_id, temporary)
            try:
                result = state.result()  # the job's result, or its exception raised here
            except BaseException:
                typer.echo(see_again)
                raise
        if not as_json:
            (show or (lambda r: typer.echo(r.to_text())))(result)
        if see_again:
            typer.echo(see_again)
    if as_json:
        print(result.to_json(), file=out, flush=True)
    return result


@contextmanager
def _human_lines_to_stderr(on: bool) -> Iterator[None]:
    """With ``--json``, every line meant for a person (Prefect's console, progress, the run's
    link) goes to stderr, so stdout is the JSON alone."""
    if not on:
        yield
        return
    from contextlib import redirect_stdout

    with redirect_stdout(sys.stderr):
        yield


def run_link(api_url: str, flow_run_id: Any, temporary: bool) -> str:
    """How to see a flow run again: its page on a lasting server, or ``qsae ui`` after a temporary one."""
    if not temporary:
        return f"this run in the Prefect UI: {api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    return (f"this run (its logs, artifact and figures) stays in Prefect's database; to see it again run `qsae ui` "
            f"and open http://127.0.0.1:{UI_PORT}/runs/flow-run/{flow_run_id}")


UI_PORT = 4200
