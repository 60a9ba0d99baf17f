"""The ``qsae`` command line: configs from a file plus overrides, run through Prefect or not.

It lives beside the flows (the top layer) so that ``qsae/`` never imports Prefect; commands
that only read a lake import no Prefect and no torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
import yaml

from qsae.jobs import configs as C  # torch-free: the options' help comes from the fields' descriptions
from qsae.jobs.preflight import preflight  # torch-free

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="qsae: an activation data lake for SAE interpretability research.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or JSON file with the run's fields")
SetOpt = typer.Option(None, "--set", help="override any field: --set key=value (value parsed as YAML)")
TIMES: dict[str, float] = {}  # stage -> seconds, printed at the end of the demo

PrefectOpt = typer.Option(True, "--prefect/--no-prefect", help="run as a Prefect flow (default) or in-process")


def field_help(cls, field: str, note: str = "") -> str:
    """A config field's description (the one source of truth for the CLI and Prefect), with the
    config's default when it has one."""
    info = cls.model_fields[field]
    default = info.get_default(call_default_factory=True)
    text = info.description + (f" {note}" if note else "")
    return text + (f" (default: {default})" if default not in (None, "", [], {}) else "")


def field_opt(cls, field: str, *decls: str, note: str = "", **kw: Any) -> Any:
    """A ``typer.Option`` for a config field, its help generated from the field's description."""
    return typer.Option(None, *decls, help=field_help(cls, field, note), **kw)


def build_config(model_cls, config_file: Path | None, sets: list[str] | None, **options: Any):
    """A validated config: file fields, then explicit options, then --set overrides."""
    data: dict[str, Any] = {}
    if config_file is not None:
        text = config_file.read_text()
        data = (json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)) or {}
    data.update({k: v for k, v in options.items() if v is not None})
    for item in sets or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(value)
    try:
        return model_cls(**data)
    except Exception as exc:  # pydantic's message names each bad field
        raise typer.BadParameter(str(exc)) from None


def parse_layers(layers: str | None) -> list[int] | None:
    if layers is None:
        return None
    try:
        return [int(x) for x in layers.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"--layers expects comma-separated integers, got {layers!r}") from None


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


def _require_named_store(cfg: Any, what: str) -> None:
    """Write only into a lake the user named (option, config file or --set): a default would
    resume, or refuse, a lake someone else made there."""
    if "store" not in cfg.model_fields_set:
        from qsae.errors import UsageError

        whose = "the demo's lake; `qsae demo` builds that one" if what == "capture" else "the default token lake"
        raise UsageError(f"name the lake to write with --store PATH (without it the {what} would write into "
                         f"{cfg.store}, {whose})")


JsonOpt = typer.Option(False, "--json", help="print the result as JSON (for scripts) instead of the summary")


def _load(path: str) -> Any:
    """``module:name`` imported when called: the checks run before torch and Prefect are imported."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_job(cfg: Any, flow: str, local: str | Callable[[Any], Any], prefect: bool, as_json: bool,
            **flow_kwargs: Any) -> Any:
    """The one way a command runs a job: cheap checks first, then the job through its Prefect flow
    (``flow``, which returns the job's typed result as it is) or in-process (``local``, a
    ``module:function`` or a function of the config); then the result, rendered."""
    out = sys.stdout
    with _human_lines_to_stderr(as_json):  # --json: stdout holds the JSON alone
        preflight(cfg)
        if not prefect:
            result = (_load(local) if isinstance(local, str) else local)(cfg)
            see_again = None
        else:
            from flows.server import configured_api_url

            flow_fn, temporary = _load(flow), configured_api_url() is None
            with _prefect(describe=lambda: lake_state_line(cfg)) as url:
                state = flow_fn(config=cfg, return_state=True, **flow_kwargs)
            see_again = run_link(url, state.state_details.flow_run_id, temporary)
            try:
                result = state.result()  # the job's result, or its exception raised here
            except BaseException:
                typer.echo(see_again)
                raise
        if not as_json:
            typer.echo(result.to_text())
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


@app.command()
def ui(port: int = typer.Option(UI_PORT, help="the UI's port on 127.0.0.1")) -> None:
    """The Prefect UI on every run the qsae commands made on this machine (Ctrl-C stops it).

    The commands' temporary servers stop when the command ends; their runs stay in Prefect's
    database, which this server reads. Unlike a bare ``prefect server start --port N``, the UI
    is pointed at its own API (PREFECT_UI_API_URL), so any port works."""
    from flows.server import TemporaryServer, _healthy, configured_api_url, prefect_home
    from qsae.errors import UsageError

    if configured_api_url():
        typer.echo(f"PREFECT_API_URL is set: the runs are on that server; its UI is at "
                   f"{configured_api_url().removesuffix('/api')}")
        return
    if _healthy(f"http://127.0.0.1:{port}/api"):
        typer.echo(f"a Prefect server already answers at http://127.0.0.1:{port}: open it")
        return
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise UsageError(f"port {port} is taken by something that is not a Prefect server: pass --port N")
    server = TemporaryServer(port=port, log_path=prefect_home() / f"qsae-ui-{port}.log")
    typer.echo(f"starting the Prefect UI on Prefect's database in {prefect_home()} (log: {server.log_path}) ...")
    server.start()
    typer.echo(f"Prefect UI: http://127.0.0.1:{port}  (every qsae run on this machine; Ctrl-C stops it)")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        typer.echo("stopping the Prefect UI")
    finally:
        server.stop()


def _echo_open(store: str) -> None:
    typer.echo(f"\nstore: {store}")
    typer.echo(f'open it: python -c "import xarray as xr; print(xr.open_zarr({store!r}))"')


@app.command()
def capture(
    config: Path | None = ConfigOpt,
    model: str | None = field_opt(C.CaptureConfig, "model"),
    sae: str | None = field_opt(C.CaptureConfig, "sae"),
    sae_k: int | None = field_opt(C.CaptureConfig, "sae_k"),
    hook: str | None = field_opt(C.CaptureConfig, "hook"),
    layers: str | None = field_opt(C.CaptureConfig, "layers", note="(comma-separated)"),
    dataset: str | None = field_opt(C.CaptureConfig, "dataset"),
    store: str | None = field_opt(C.CaptureConfig, "store"),
    samples: int | None = field_opt(C.SamplingConfig, "n_samples", "--samples"),
    limit: int | None = field_opt(C.CaptureConfig, "limit"),
    max_new_tokens: int | None = field_opt(C.SamplingConfig, "max_new_tokens"),
    device: str | None = field_opt(C.CaptureConfig, "device"),
    mode: str | None = field_opt(C.CaptureConfig, "mode"),
    shards_per_task: int = typer.Option(4, help="shards per Prefect task"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Sample completions and capture residuals + SAE codes into a question lake."""
    cfg = build_config(C.CaptureConfig, config, set_, model=model, sae=sae, sae_k=sae_k, hook=hook, layers=parse_layers(layers),
                       dataset=dataset, store=store, n_samples=samples, limit=limit,
                       max_new_tokens=max_new_tokens, device=device, mode=mode)
    _require_named_store(cfg, "capture")
    def local(cfg):
        from qsae.jobs.capture import CaptureResult, run_capture

        lake, stats = run_capture(cfg, progress=True)
        return CaptureResult.of(lake, stats.shards, [stats])

    run_job(cfg, "flows.capture:capture_flow", local, prefect, as_json, shards_per_task=shards_per_task)


@app.command()
def demo(
    store: str = typer.Option("storage/lakes/demo.zarr", help="where to write the demo lake"),
    questions: int = typer.Option(64, help="how many of the shipped PopQA questions"),
    prefect: bool = PrefectOpt,
) -> None:
    """The embedded default: SmolLM2-135M + its shipped TopK SAE on real PopQA questions."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    server = None
    if prefect:  # its database migrates while the model is converted
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from flows.server import launch_if_needed

        server = launch_if_needed(typer.echo)
    try:
        from qsae.jobs.capture import run_capture
        from qsae.jobs.demo import demo_capture_config, ensure_demo_model, ensure_demo_sae

        TIMES["imports (torch, transformers)"] = time.perf_counter() - t0
        t = time.perf_counter()
        converted = ensure_demo_model()
        TIMES["model conversion (GGUF, once)" if converted else "model (already converted)"] = time.perf_counter() - t
        t = time.perf_counter()
        sae = ensure_demo_sae()
        TIMES["SAE"] = time.perf_counter() - t
        cfg = demo_capture_config(store, sae, questions)
        cfg = cfg.model_copy(update={"store": cfg.ref.absolute})  # the path it prints is the one it writes
        typer.echo(f"capturing {questions} PopQA questions x {cfg.sampling.n_samples} samples through SmolLM2 layer "
                   f"{cfg.layers} and {sae} into {cfg.store}")
        if prefect:
            from flows.capture import capture_flow

            with _prefect(server, describe=lambda: lake_state_line(cfg)) as url:
                t = time.perf_counter()
                state = capture_flow(config=cfg, shards_per_task=1, return_state=True)
                TIMES["capture (Prefect flow)"] = time.perf_counter() - t
            see_again = run_link(url, state.state_details.flow_run_id, temporary=server is not None)
            result = state.result()
            typer.echo(f"{result.done} of {result.n_questions} questions done")
        else:
            t = time.perf_counter()
            run_capture(cfg, progress=True)
            TIMES["capture (in-process)"] = time.perf_counter() - t
    finally:
        if server is not None:  # also when conversion or capture failed: never leave it running
            server.stop()
    _echo_open(cfg.store)
    _echo_times(time.perf_counter() - t0)
    if prefect:
        typer.echo(see_again)


@app.command("demo-sae")
def demo_sae(out: Path = typer.Option(..., help="folder for the SAELens export")) -> None:
    """Train the demo SAE from scratch with the recipe of the one shipped in qsae/data/demo_sae."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsae.jobs.demo import SHIPPED_SAE, ensure_demo_model, train_demo_sae

    ensure_demo_model()
    folder = train_demo_sae(out)
    made = json.loads((folder / "recipe.json").read_text())["sae_weights_sha256"]
    shipped = json.loads((SHIPPED_SAE / "recipe.json").read_text())["sae_weights_sha256"]
    same = "identical to" if made == shipped else "DIFFERENT from"
    typer.echo(f"{folder}: sae_weights.safetensors sha256 {made}, {same} the shipped {SHIPPED_SAE}")


def _echo_times(command_seconds: float) -> None:
    """Where a run's time went: set-up (from run.sh), then each stage of the command."""
    setup = os.environ.get("QSAE_SETUP_SECONDS", "")
    rows = ([("set-up (scripts/setup.sh)", float(setup))] if setup else []) + list(TIMES.items())
    rows.append(("other", command_seconds - sum(TIMES.values())))
    total = command_seconds + (float(setup) if setup else 0.0)
    typer.echo("\nwhere the time went:")
    for name, sec in rows:
        typer.echo(f"  {name:<32} {sec:7.1f} s")
    typer.echo(f"  {'total':<32} {total:7.1f} s")


@app.command()
def collect(
    config: Path | None = ConfigOpt,
    model: str | None = field_opt(C.CollectConfig, "model"),
    dataset: str | None = field_opt(C.CollectConfig, "dataset"),
    layers: str | None = field_opt(C.CollectConfig, "layers", note="(comma-separated)"),
    hook: str | None = field_opt(C.CollectConfig, "hook"),
    store: str | None = field_opt(C.CollectConfig, "store"),
    max_tokens: int | None = field_opt(C.CollectConfig, "max_tokens"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Stream a text corpus through a model into a token lake (for SAE training)."""
    cfg = build_config(C.CollectConfig, config, set_, model=model, dataset=dataset, layers=parse_layers(layers),
                       hook=hook, store=store, max_tokens=max_tokens)
    _require_named_store(cfg, "collection")

    def local(cfg):
        from qsae.jobs.collect import CollectResult, collect

        return CollectResult.of(collect(cfg, progress=True))

    run_job(cfg, "flows.train:collect_flow", local, prefect, as_json)


@app.command()
def train(
    config: Path | None = ConfigOpt,
    store: str | None = field_opt(C.TrainConfig, "store"),
    layer: int | None = field_opt(C.TrainConfig, "layer"),
    architecture: str | None = field_opt(C.TrainConfig, "architecture"),
    k: int | None = field_opt(C.TrainConfig, "k"),
    out: str | None = field_opt(C.TrainConfig, "out"),
    epochs: float | None = field_opt(C.TrainConfig, "epochs"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Train a TopK or ReLU+L1 SAE from a token lake; writes a SAELens folder."""
    cfg = build_config(C.TrainConfig, config, set_, store=store, layer=layer, architecture=architecture, k=k,
                       out=out, epochs=epochs)
    run_job(cfg, "flows.train:train_flow", lambda cfg: _load("qsae.jobs.train:train_sae")(cfg, progress=True),
            prefect, as_json)


@app.command()
def rivalry(
    store: str = typer.Argument(..., help=C.RivalryConfig.model_fields["store"].description),
    config: Path | None = ConfigOpt,
    layer: list[int] | None = field_opt(C.RivalryConfig, "layers", "--layer", note="(repeat --layer N)"),
    protocol: str | None = field_opt(C.RivalryConfig, "protocol"),
    rule: str | None = field_opt(C.RivalryConfig, "rule"),
    entropy: str | None = field_opt(C.RivalryConfig, "entropy"),
    n_perm: int | None = field_opt(C.RivalryConfig, "n_perm"),
    strata: str | None = field_opt(C.RivalryConfig, "strata"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Feature rivalry, the paper's protocol by default, with calibrated p-values for every layer."""
    cfg = build_config(C.RivalryConfig, config, set_, store=store, layers=layer or None, protocol=protocol, rule=rule,
                       entropy=entropy, n_perm=n_perm, strata=strata)
    run_job(cfg, "flows.rivalry:rivalry_flow", lambda cfg: _load("qsae.jobs.rivalry:run_rivalry")(cfg, progress=True),
            prefect, as_json)


@app.command()
def features(
    store: str = typer.Argument(..., help=C.FeaturesConfig.model_fields["store"].description),
    config: Path | None = ConfigOpt,
    layer: list[int] | None = field_opt(C.FeaturesConfig, "layers", "--layer", note="(repeat --layer N)"),
    neuronpedia: str | None = field_opt(C.FeaturesConfig, "neuronpedia"),
    top_n: int | None = field_opt(C.FeaturesConfig, "top_n"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Feature dashboards (static HTML, opens from file://) and an optional Neuronpedia export."""
    cfg = build_config(C.FeaturesConfig, config, set_, store=store, layers=layer or None, neuronpedia=neuronpedia,
                       top_n=top_n)
    run_job(cfg, "flows.features:features_flow", "qsae.jobs.features:run_features", prefect, as_json)


@app.command()
def reconstruct(
    store: str = typer.Argument(..., help=C.ReconstructionConfig.model_fields["store"].description),
    config: Path | None = ConfigOpt,
    layers: str | None = field_opt(C.ReconstructionConfig, "layers", note="(comma-separated)"),
    model_in_loop: bool | None = field_opt(C.ReconstructionConfig, "model_in_loop", "--model-in-loop/--offline"),
    sae: str | None = field_opt(C.ReconstructionConfig, "sae"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """SAEBench-style reconstruction metrics per layer and position (offline; optionally with the model)."""
    cfg = build_config(C.ReconstructionConfig, config, set_, store=store, layers=parse_layers(layers),
                       model_in_loop=model_in_loop, sae=sae)
    run_job(cfg, "flows.reconstruction:reconstruction_flow",
            lambda cfg: _load("qsae.jobs.reconstruction:run_reconstruction")(cfg, progress=True), prefect, as_json)


@app.command()
def verify(
    store: str = typer.Argument(..., help="question lake URL"),
    reencode: int = typer.Option(0, help="re-encode this many random stored rows per layer with the SAE"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a lake against its schema and invariants; exit status 1 if anything is wrong."""
    from qsae.errors import QsaeError
    from qsae.lake.verify import verify as run

    try:
        report = run(store, reencode=reencode)
    except Exception as exc:  # --json promises JSON: whatever went wrong is in it
        if not as_json:
            raise
        typer.echo(json.dumps({"store": store, "ok": False, "problems": [f"{type(exc).__name__}: {exc}"],
                               "checks": {}}, indent=1))
        raise typer.Exit(code=2 if isinstance(exc, QsaeError) else 1) from None
    typer.echo(report.to_json() if as_json else report.text())
    raise typer.Exit(code=0 if report.ok else 1)


@app.command()
def inspect(
    store: str = typer.Argument(..., help="lake URL"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    full: bool = typer.Option(False, "--full", help="print long attributes whole (they are cut otherwise)"),
) -> None:
    """Summarise a store: dims, variables (dtype, size, layout), done fraction, lineage, results."""
    from qsae.lake.inspect import inspect_store, render

    info = inspect_store(store, full=full)
    typer.echo(json.dumps(info, indent=1) if as_json else render(info))


@app.command()
def compare(
    base_sae: str = typer.Option(..., help=field_help(C.CompareConfig, "base_sae")),
    finetuned_sae: str = typer.Option(..., help=field_help(C.CompareConfig, "finetuned_sae")),
    layer: int | None = field_opt(C.CompareConfig, "layer"),
    base_lake: str | None = field_opt(C.CompareConfig, "base_lake"),
    finetuned_lake: str | None = field_opt(C.CompareConfig, "finetuned_lake"),
    inputs: str | None = field_opt(C.CompareConfig, "inputs"),
    out: str | None = field_opt(C.CompareConfig, "out"),
    threshold: float | None = field_opt(C.CompareConfig, "threshold"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Match two SAEs' features (decoder cosine, optimal assignment) and their firing in two lakes."""
    cfg = build_config(C.CompareConfig, None, set_, base_sae=base_sae, finetuned_sae=finetuned_sae, layer=layer,
                       base_lake=base_lake, finetuned_lake=finetuned_lake, inputs=inputs, out=out, threshold=threshold)
    run_job(cfg, "flows.compare:compare_flow", "qsae.jobs.compare:run_compare", prefect, as_json)


@app.command("demo-compare")
def demo_compare(
    steps: int = typer.Option(300, help="fine-tuning steps"),
    questions: int = typer.Option(32, help="PopQA questions captured on each model"),
) -> None:
    """Base vs fine-tuned on CPU: fine-tune SmolLM2 on PopQA answers, an SAE for each, compare."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsae.jobs.demo_compare import build_and_compare

    res, baseline = build_and_compare(finetune_steps=steps, questions=questions)
    typer.echo(f"control (the base SAE vs itself continued on base activations): {baseline['matched']} matched, "
               f"{baseline['matched_above_0.9']} above 0.9, {baseline['emerged']} emerged, {baseline['vanished']} "
               f"vanished (mean similarity {baseline['mean_matched_similarity']:.3f})")
    typer.echo("the base SAE vs itself continued on fine-tuned activations:")
    typer.echo(res.to_text())


DEBUG_ENV = "QSAE_DEBUG"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)")) -> None:
    """qsae: an activation data lake for SAE interpretability research."""


def show_job_logs() -> None:
    """The jobs log through stdlib loggers under ``qsae``; the CLI prints their INFO lines on
    stdout as its own output (inside a Prefect run, flows.logs also forwards them to the run's logs)."""
    import logging

    class CurrentStdout(logging.StreamHandler):
        """Writes to whatever sys.stdout is when a line is logged (not when the handler was made:
        a redirected or captured stdout may be closed by then)."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stdout

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("qsae")
    if not any(getattr(h, "_qsae_cli", False) for h in logger.handlers):
        handler = CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._qsae_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """The ``qsae`` entry point: qsae's own errors (``QsaeError``) as plain lines and exit status 2.

    A bug (any other exception) still shows its traceback; ``--debug`` anywhere on the command
    line, or ``QSAE_DEBUG=1``, shows it for qsae's errors too.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    from qsae.errors import QsaeError

    show_job_logs()
    try:
        app(args=args, prog_name="qsae")
    except QsaeError as exc:
        if debug:
            raise
        typer.echo(f"qsae: error: {exc}", err=True)
        typer.echo(f"(a {type(exc).__name__}; run with --debug for the traceback)", err=True)
        raise SystemExit(2) from None
    except OSError as exc:  # a full disk anywhere (figures, caches, temporary files): one line too
        import errno

        if debug or exc.errno != errno.ENOSPC:
            raise
        typer.echo(f"qsae: error: out of disk space ({exc.filename or 'writing'}): free space and rerun; "
                   "done regions of a lake are kept", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # python -m flows.cli
    main()
