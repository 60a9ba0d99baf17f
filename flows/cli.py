"""The ``qsae`` command line: configs from a file plus overrides, run through Prefect or not.

It lives beside the flows (the top layer) so that ``qsae/`` never imports Prefect; commands
that only read a lake import no Prefect and no torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="qsae: an activation data lake for SAE interpretability research.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or JSON file with the run's fields")
SetOpt = typer.Option(None, "--set", help="override any field: --set key=value (value parsed as YAML)")
TIMES: dict[str, float] = {}  # stage -> seconds, printed at the end of the demo

PrefectOpt = typer.Option(True, "--prefect/--no-prefect", help="run as a Prefect flow (default) or in-process")


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


@contextmanager
def _prefect(server=None):
    """A Prefect API for the flow: PREFECT_API_URL if set, else a temporary server of our own
    (``server``, if the command launched it early to overlap its start with other work)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.server import prefect_api

    t0 = time.perf_counter()
    with prefect_api(typer.echo, server=server) as url:
        TIMES["Prefect server start (wait)"] = time.perf_counter() - t0
        yield url


def _echo_open(store: str) -> None:
    typer.echo(f"\nstore: {store}")
    typer.echo(f'open it: python -c "import xarray as xr; print(xr.open_zarr({store!r}))"')


@app.command()
def capture(
    config: Path | None = ConfigOpt,
    model: str | None = typer.Option(None, help="model folder, cached HF repo id, or 'smollm2'"),
    sae: str | None = typer.Option(None, help="SAE folder/file/cached repo id (one per layer)"),
    sae_k: int | None = typer.Option(None, help="k of the stored codes (default: the SAE's)"),
    layers: str | None = typer.Option(None, help="comma-separated layers, e.g. 20 or 10,20,30"),
    dataset: str | None = typer.Option(None, help="'popqa-demo', a .jsonl/.json/.tsv/.txt file, or a cached HF dataset"),
    store: str | None = typer.Option(None, help="lake URL: a path, s3://bucket/x.zarr, ..."),
    samples: int | None = typer.Option(None, help="completions per question (default 20)"),
    limit: int | None = typer.Option(None, help="only the first N questions"),
    max_new_tokens: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    mode: str | None = typer.Option(None, help="resume (default), overwrite, create"),
    shards_per_task: int = typer.Option(4, help="shards per Prefect task"),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Sample completions and capture residuals + SAE codes into a question lake."""
    from qsae.jobs.capture import CaptureConfig, run_capture

    cfg = build_config(CaptureConfig, config, set_, model=model, sae=sae, sae_k=sae_k, layers=parse_layers(layers),
                       dataset=dataset, store=store, n_samples=samples, limit=limit,
                       max_new_tokens=max_new_tokens, device=device, mode=mode)
    if prefect:
        from flows.capture import capture_flow

        with _prefect():
            result = capture_flow(config=cfg, shards_per_task=shards_per_task)
        typer.echo(f"{result['done']} of {result['n_questions']} questions done")
        _echo_open(result["store"])
    else:
        lake, stats = run_capture(cfg, typer.echo, progress=True)
        typer.echo(f"{stats.questions} questions captured, {stats.tokens_per_second:.0f} tokens/s")
        _echo_open(lake.url)


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
        from qsae.jobs.capture import run_capture, store_path_for
        from qsae.jobs.demo import demo_capture_config, ensure_demo_model, ensure_demo_sae

        TIMES["imports (torch, transformers)"] = time.perf_counter() - t0
        t = time.perf_counter()
        converted = ensure_demo_model(log_fn=typer.echo)
        TIMES["model conversion (GGUF, once)" if converted else "model (already converted)"] = time.perf_counter() - t
        t = time.perf_counter()
        sae = ensure_demo_sae(log_fn=typer.echo)
        TIMES["SAE"] = time.perf_counter() - t
        cfg = demo_capture_config(store, sae, questions)
        cfg = cfg.model_copy(update={"store": store_path_for(cfg)})
        typer.echo(f"capturing {questions} PopQA questions x {cfg.n_samples} samples through SmolLM2 layer "
                   f"{cfg.layers} and {sae} into {cfg.store}")
        if prefect:
            from flows.capture import capture_flow

            with _prefect(server):
                t = time.perf_counter()
                result = capture_flow(config=cfg, shards_per_task=1)
                TIMES["capture (Prefect flow)"] = time.perf_counter() - t
            typer.echo(f"{result['done']} of {result['n_questions']} questions done")
        else:
            t = time.perf_counter()
            run_capture(cfg, typer.echo, progress=True)
            TIMES["capture (in-process)"] = time.perf_counter() - t
    finally:
        if server is not None:  # also when conversion or capture failed: never leave it running
            server.stop()
    _echo_open(cfg.store)
    _echo_times(time.perf_counter() - t0)


@app.command("demo-sae")
def demo_sae(out: Path = typer.Option(..., help="folder for the SAELens export")) -> None:
    """Train the demo SAE from scratch with the recipe of the one shipped in qsae/data/demo_sae."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsae.jobs.demo import SHIPPED_SAE, ensure_demo_model, train_demo_sae

    ensure_demo_model(log_fn=typer.echo)
    folder = train_demo_sae(out, log_fn=typer.echo)
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
    model: str | None = typer.Option(None),
    dataset: str | None = typer.Option(None, help="'wiki-demo', a .txt/.jsonl file or a cached HF dataset"),
    layers: str | None = typer.Option(None),
    hook: str | None = typer.Option(None, help="resid_post or mlp_out"),
    store: str | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Stream a text corpus through a model into a token lake (for SAE training)."""
    from qsae.jobs.collect import CollectConfig
    from qsae.jobs.collect import collect as run

    cfg = build_config(CollectConfig, config, set_, model=model, dataset=dataset, layers=parse_layers(layers),
                       hook=hook, store=store, max_tokens=max_tokens)
    if prefect:
        from flows.train import collect_flow

        with _prefect():
            typer.echo(collect_flow(config=cfg))
    else:
        lake = run(cfg, typer.echo, progress=True)
        typer.echo(f"{lake.n_units} tokens in {lake.url}")


@app.command()
def train(
    config: Path | None = ConfigOpt,
    store: str | None = typer.Option(None, help="token lake to train from"),
    layer: int | None = typer.Option(None),
    architecture: str | None = typer.Option(None, help="topk or relu"),
    k: int | None = typer.Option(None),
    out: str | None = typer.Option(None, help="output SAELens folder"),
    epochs: float | None = typer.Option(None),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Train a TopK or ReLU+L1 SAE from a token lake; writes a SAELens folder."""
    from qsae.jobs.train import TrainConfig, train_sae

    cfg = build_config(TrainConfig, config, set_, store=store, layer=layer, architecture=architecture, k=k,
                       out=out, epochs=epochs)
    if prefect:
        from flows.train import train_flow

        with _prefect():
            typer.echo(train_flow(config=cfg))
    else:
        res = train_sae(cfg, progress=True)
        typer.echo(json.dumps({"out": str(res.out), **res.final}, indent=1))


@app.command()
def rivalry(
    store: str = typer.Argument(..., help="question lake URL"),
    config: Path | None = ConfigOpt,
    layer: list[int] | None = typer.Option(None, help="a layer to test (repeat it); default: every captured layer"),
    protocol: str | None = typer.Option(None, help="paper (default) or per_question"),
    rule: str | None = typer.Option(None, help="thresholds (default: > 0.7 / < 0.5), median, quantile, threshold"),
    entropy: str | None = typer.Option(None, help="first_word (default), exact or sampled"),
    n_perm: int | None = typer.Option(None, help="label permutations of the calibrated test (default 1000)"),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Feature rivalry, the paper's protocol by default, with calibrated p-values for every layer."""
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry
    from qsae.lake.results import summary_json

    cfg = build_config(RivalryConfig, config, set_, store=store, layers=layer or None, protocol=protocol, rule=rule,
                       entropy=entropy, n_perm=n_perm)
    if prefect:
        from flows.rivalry import rivalry_flow

        with _prefect():
            out = rivalry_flow(config=cfg)
        summary, group, figures = out["summary"], out["group"], out["figures"]
    else:
        res = run_rivalry(cfg, progress=True)
        summary, group, figures = res.summary, res.group, res.figures
    for layer_, r in summary["by_layer"].items():
        c = r["calibrated"]
        paper = (r.get("paper") or r.get("descriptive") or {}).get("p_less")
        typer.echo(f"layer {layer_}: calibrated p = {c.get('p_less')} (Holm {c.get('p_less_holm')}), "
                   f"{'paper MWU' if 'paper' in r else 'unconditional MWU'} p = {paper} (not calibrated)")
    typer.echo(summary_json(summary["groups"]))
    typer.echo(f"results: {store} group {group!r}; figures: {figures}")


@app.command()
def reconstruct(
    store: str = typer.Argument(..., help="question lake or token lake URL"),
    config: Path | None = ConfigOpt,
    layers: str | None = typer.Option(None),
    model_in_loop: bool | None = typer.Option(None, "--model-in-loop/--offline", help="also CE loss recovered and "
                                                                                   "kl_div_score"),
    sae: str | None = typer.Option(None, help="question lake: SAE source if it moved (hash checked); "
                                              "token lake: the SAE to evaluate"),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """SAEBench-style reconstruction metrics per layer and position (offline; optionally with the model)."""
    from qsae.jobs.reconstruction import ReconstructionConfig, run_reconstruction, table_rows

    cfg = build_config(ReconstructionConfig, config, set_, store=store, layers=parse_layers(layers),
                       model_in_loop=model_in_loop, sae=sae)
    if prefect:
        from flows.reconstruction import reconstruction_flow

        with _prefect():
            out = reconstruction_flow(config=cfg)
        rows, figure = out["rows"], out["figure"]
    else:
        res = run_reconstruction(cfg)
        rows, figure = table_rows(res.table), res.figure
        for label, what in res.table.attrs["positions"].items():
            typer.echo(f"{label}: {what}")
    for row in rows:
        typer.echo(json.dumps(row))
    typer.echo(f"results: {store} group 'reconstruction'; figure: {figure}")


@app.command()
def verify(
    store: str = typer.Argument(..., help="question lake URL"),
    reencode: int = typer.Option(0, help="re-encode this many random stored rows per layer with the SAE"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a lake against its schema and invariants; exit status 1 if anything is wrong."""
    from qsae.lake.verify import verify as run

    report = run(store, reencode=reencode)
    typer.echo(report.to_json() if as_json else report.text())
    raise typer.Exit(code=0 if report.ok else 1)


@app.command()
def inspect(
    store: str = typer.Argument(..., help="lake URL"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Summarise a store: dims, variables (dtype, size, layout), done fraction, lineage, results."""
    from qsae.lake.inspect import inspect_store, render

    info = inspect_store(store)
    typer.echo(json.dumps(info, indent=1) if as_json else render(info))


@app.command()
def compare(
    base_sae: str = typer.Option(..., help="SAE of the base model"),
    finetuned_sae: str = typer.Option(..., help="SAE of the fine-tuned model (may be the same SAE)"),
    layer: int | None = typer.Option(None),
    base_lake: str | None = typer.Option(None, help="question lake captured on the base model"),
    finetuned_lake: str | None = typer.Option(None, help="question lake captured on the fine-tuned model"),
    out: str | None = typer.Option(None, help="store for the results (default: the fine-tuned lake)"),
    threshold: float | None = typer.Option(None, help="emerged/vanished below this cosine (default 0.7)"),
    prefect: bool = PrefectOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Match two SAEs' features (decoder cosine, optimal assignment) and their firing in two lakes."""
    from qsae.jobs.compare import CompareConfig, run_compare
    from qsae.lake.results import summary_json

    cfg = build_config(CompareConfig, None, set_, base_sae=base_sae, finetuned_sae=finetuned_sae, layer=layer,
                       base_lake=base_lake, finetuned_lake=finetuned_lake, out=out, threshold=threshold)
    if prefect:
        from flows.compare import compare_flow

        with _prefect():
            res = compare_flow(config=cfg)
        summary, figure = res["summary"], res["figure"]
    else:
        r = run_compare(cfg, typer.echo)
        summary, figure = r.summary, r.figure
    typer.echo(summary_json({k: v for k, v in summary.items() if k != "emerged_examples"}))
    typer.echo(f"figure: {figure}")


@app.command("demo-compare")
def demo_compare(
    steps: int = typer.Option(300, help="fine-tuning steps"),
    questions: int = typer.Option(32, help="PopQA questions captured on each model"),
) -> None:
    """Base vs fine-tuned on CPU: fine-tune SmolLM2 on PopQA answers, an SAE for each, compare."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsae.jobs.demo_compare import build_and_compare
    from qsae.lake.results import summary_json

    res, baseline = build_and_compare(finetune_steps=steps, questions=questions, log_fn=typer.echo)
    keys = ("matched", "matched_above_0.9", "emerged", "vanished", "mean_matched_similarity")
    typer.echo("control (base SAE vs itself continued on base activations): " + json.dumps({k: baseline[k] for k in keys}))
    typer.echo("base SAE vs itself continued on fine-tuned activations: " + json.dumps({k: res.summary[k] for k in keys}))
    typer.echo(summary_json({k: v for k, v in res.summary.items() if k != "emerged_examples"}))
    typer.echo(f"figure: {res.figure}")


DEBUG_ENV = "QSAE_DEBUG"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)")) -> None:
    """qsae: an activation data lake for SAE interpretability research."""


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

    try:
        app(args=args, prog_name="qsae")
    except QsaeError as exc:
        if debug:
            raise
        typer.echo(f"qsae: error: {exc}", err=True)
        typer.echo(f"(a {type(exc).__name__}; run with --debug for the traceback)", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # python -m flows.cli
    main()
