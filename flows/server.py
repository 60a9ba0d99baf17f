"""A Prefect API for commands run without one: ``PREFECT_API_URL`` if set, else a server of our own.

Prefect's own fallback (the "ephemeral" subprocess server) gives up after 20 s, and a fresh
database on a busy 2-core machine takes longer than that to migrate, so a first
``./run.sh demo`` failed after all its set-up. Here the temporary server is an ordinary
``prefect server start`` on a free loopback port, logging to a file, waited for through its
health endpoint for as long as ``QSAE_PREFECT_START_TIMEOUT_S`` allows (default 600 s); if it
exits or never answers, the error says so and names the log. It is stopped when the command ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qsae.errors import QsaeError

START_TIMEOUT_ENV = "QSAE_PREFECT_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 600.0


class PrefectServerError(QsaeError):
    """The temporary Prefect API server could not be started."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def configured_api_url() -> str | None:
    """The Prefect API this process would talk to (env or active profile), or None."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


class TemporaryServer:
    """A ``prefect server start`` process on loopback, its URL and its log."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, ui: bool = True):
        self.port = port or int(os.environ.get("QSAE_PREFECT_PORT", 0)) or _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = log_path or prefect_home() / f"qsae-server-{self.port}.log"
        self.ui = ui
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = float("nan")

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until its health endpoint answers; raise if it cannot."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process without waiting (its database migrates meanwhile)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # The UI asks its server where the API is; without this it points at the default port
        # 4200 and a user opening the printed address sees "Can't connect to Server API".
        env["PREFECT_UI_API_URL"] = self.api_url
        exe = Path(sys.executable).parent / "prefect"
        cmd = [str(exe) if exe.exists() else "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(self.port)] + ([] if self.ui else ["--no-ui"])
        self._t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the health endpoint (up to ``timeout`` s from launch); raise naming the log."""
        if self.proc is None:
            raise PrefectServerError("the temporary Prefect API server was never launched")
        timeout = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)) if timeout is None else timeout
        t0 = self._t0
        while True:
            if self.proc.poll() is not None:
                raise PrefectServerError(
                    f"the temporary Prefect API server exited with status {self.proc.returncode} before it was "
                    f"ready; its log is {self.log_path}:\n{_tail(self.log_path)}")
            if _healthy(self.api_url):
                break
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise PrefectServerError(
                    f"the temporary Prefect API server did not answer {self.api_url}/health within {timeout:.0f} s "
                    f"(raise {START_TIMEOUT_ENV}, or point PREFECT_API_URL at a running server); its log is "
                    f"{self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


class ApiWatch(threading.Thread):
    """Watches the Prefect API a command runs against and calls ``on_lost`` once when it is gone:
    the temporary server's process exited, or the API missed ``misses`` health checks in a row.
    Without it a run whose server died finishes its tasks, then retries the API for minutes and
    ends in a long ``httpx.ConnectError`` traceback."""

    def __init__(self, api_url: str, on_lost: Callable[[], None], proc: subprocess.Popen | None = None,
                 every: float = 1.0, misses: int = 3):
        super().__init__(name="qsae-prefect-watch", daemon=True)
        self.api_url, self.on_lost, self.proc, self.every, self.misses = api_url, on_lost, proc, every, misses
        self._done = threading.Event()

    def run(self) -> None:
        missed = 0
        while not self._done.wait(self.every):
            if self.proc is not None:
                gone = self.proc.poll() is not None
            else:
                missed = 0 if _healthy(self.api_url, timeout=2.0) else missed + 1
                gone = missed >= self.misses
            if gone and not self._done.is_set():
                self.on_lost()
                return

    def stop(self) -> None:
        self._done.set()


def _drain_prefect_workers() -> None:
    """Flush the logs and events the client still holds before their server goes away."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception:  # best effort: nothing is lost that the lake needs
        pass


def launch_if_needed(log_fn: Callable[[str], None] = print, ui: bool = True) -> TemporaryServer | None:
    """Launch a temporary server now (not waiting) if no API is configured, so that its start
    overlaps other work; hand it to ``prefect_api(server=...)`` later. None if one is configured."""
    if configured_api_url():
        return None
    server = TemporaryServer(ui=ui)
    log_fn(f"starting a temporary Prefect server (log: {server.log_path}) ...")
    server.launch()
    return server


@contextmanager
def prefect_api(log_fn: Callable[[str], None] = print, ui: bool = True,
                server: TemporaryServer | None = None, on_lost: Callable[[], None] | None = None) -> Iterator[str]:
    """Yield the Prefect API URL to run flows against, starting a temporary server if none is set.

    With ``PREFECT_API_URL`` set (env or profile) nothing is started. Otherwise a server of our
    own (``server`` if one was launched early) runs for the duration of the block; its UI shows
    the runs while it lasts. ``on_lost`` is called (from a watcher thread) if the API goes away
    during the block.
    """
    url = configured_api_url()
    if url and server is None:
        watch = ApiWatch(url, on_lost) if on_lost else None
        if watch:
            watch.start()
        try:
            yield url
        finally:
            if watch:
                watch.stop()
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None:
        server = launch_if_needed(log_fn, ui)
        assert server is not None
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    log_fn(f"Prefect API up {server.startup_seconds:.1f} s after launch; UI while this runs: "
           f"{server.api_url.removesuffix('/api')}")
    watch = ApiWatch(server.api_url, on_lost, proc=server.proc) if on_lost else None
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            os.environ["PREFECT_API_URL"] = server.api_url
            if watch:
                watch.start()
            try:
                yield server.api_url
            finally:
                if watch:
                    watch.stop()  # before our own stop of the server, which is no loss
                _drain_prefect_workers()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        server.stop()
