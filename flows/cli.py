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
from pathlib import Path
from typing import Any

import typer
import yaml

from flows.console import TIMES, UI_PORT, run_job
from qsae.jobs import configs as C  # torch-free: the options' help comes from the fields' descriptions

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="qsae: an activation data lake for SAE interpretability research.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or JSON file with the run's fields")
SetOpt = typer.Option(None, "--set", help="override any field: --set key=value (value parsed as YAML)")

PrefectOpt = typer.Option(True, "--prefect/--no-prefect", help="run as a Prefect flow (default) or in-process")


def field_help(cls, field: str, note: str = "") -> str:
    """A config field's description (the one source of truth for the CLI and Prefect), with the
    config's default when it has one."""
    info = cls.field_info(field) if hasattr(cls, "field_info") else cls.model_fields[field]
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


def _require_named_store(cfg: Any, what: str) -> None:
    """Write only into a lake the user named (option, config file or --set): a default would
    resume, or refuse, a lake someone else made there."""
    if "store" not in cfg.model_fields_set:
        from qsae.errors import UsageError

        whose = "the demo's lake; `qsae demo` builds that one" if what == "capture" else "the default token lake"
        raise UsageError(f"name the lake to write with --store PATH (without it the {what} would write into "
                         f"{cfg.store}, {whose})")


JsonOpt = typer.Option(False, "--json", help="print the result as JSON (for scripts) instead of the summary")




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
    run_job(cfg, "flows.capture:capture_flow", "qsae.jobs.capture:run_capture", prefect, as_json,
            shards_per_task=shards_per_task)


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
        def show(result: Any) -> None:
            typer.echo(f"{result.done} of {result.n_questions} questions done")
            _echo_open(cfg.store)
            _echo_times(time.perf_counter() - t0)

        run_job(cfg, "flows.capture:capture_flow", "qsae.jobs.capture:run_capture", prefect, False, server=server,
                show=show, shards_per_task=1)
    finally:
        if server is not None:  # also when conversion or capture failed: never leave it running
            server.stop()


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

    run_job(cfg, "flows.train:collect_flow", "qsae.jobs.collect:collect", prefect, as_json)


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
    run_job(cfg, "flows.train:train_flow", "qsae.jobs.train:train_sae", prefect, as_json)


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
    run_job(cfg, "flows.rivalry:rivalry_flow", "qsae.jobs.rivalry:run_rivalry", prefect, as_json)


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
def steer(
    store: str = typer.Argument(..., help=C.SteerConfig.model_fields["store"].description),
    config: Path | None = ConfigOpt,
    layer: int | None = field_opt(C.SteerConfig, "layer"),
    preset: str | None = field_opt(C.SteerConfig, "preset"),
    pairs: int | None = field_opt(C.SteerConfig, "pairs"),
    prompts: int | None = field_opt(C.SteerConfig, "prompts"),
    multipliers: str | None = field_opt(C.SteerConfig, "multipliers", note="(comma-separated)"),
    units: str | None = field_opt(C.SteerConfig, "units"),
    prefect: bool = PrefectOpt,
    as_json: bool = JsonOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """The rivalry paper's steering experiment: flips along rival pairs' decoder differences."""
    mult = None
    if multipliers is not None:
        try:
            mult = [float(x) for x in multipliers.replace(" ", "").split(",") if x]
        except ValueError:
            raise typer.BadParameter(f"--multipliers expects comma-separated numbers, got {multipliers!r}") from None
    cfg = build_config(C.SteerConfig, config, set_, store=store, layer=layer, preset=preset, pairs=pairs,
                       prompts=prompts, multipliers=mult, units=units)
    run_job(cfg, "flows.steer:steer_flow", "qsae.jobs.steer:run_steer", prefect, as_json)


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
    run_job(cfg, "flows.reconstruction:reconstruction_flow", "qsae.jobs.reconstruction:run_reconstruction", prefect,
            as_json)


@app.command()
def verify(
    store: str = typer.Argument(..., help="question lake URL"),
    reencode: int = typer.Option(0, help="re-encode this many random stored rows per layer with the SAE"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a lake against its schema and invariants; exit status 1 if anything is wrong."""
    from qsae.errors import QsaeError
    from qsae.jobs.verify import verify as run

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
