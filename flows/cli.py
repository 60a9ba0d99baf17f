"""The ``qsae`` command line: configs from a file plus overrides, run through Prefect or not.

It lives beside the flows (the top layer) so that ``qsae/`` never imports Prefect; commands
that only read a lake import no Prefect and no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="qsae: an activation data lake for SAE interpretability research.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or JSON file with the run's fields")
SetOpt = typer.Option(None, "--set", help="override any field: --set key=value (value parsed as YAML)")
PrefectOpt = typer.Option(True, "--prefect/--no-prefect", help="run as a Prefect flow (default) or in-process")


def build_config(model_cls, config_file: Optional[Path], sets: Optional[list[str]], **options: Any):
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


def parse_layers(layers: Optional[str]) -> Optional[list[int]]:
    if layers is None:
        return None
    try:
        return [int(x) for x in layers.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"--layers expects comma-separated integers, got {layers!r}") from None


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _echo_open(store: str) -> None:
    typer.echo(f"\nstore: {store}")
    typer.echo(f'open it: python -c "import xarray as xr; print(xr.open_zarr({store!r}))"')


@app.command()
def capture(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None, help="model folder, cached HF repo id, or 'smollm2'"),
    sae: Optional[str] = typer.Option(None, help="SAE folder/file/cached repo id (one per layer)"),
    sae_k: Optional[int] = typer.Option(None, help="k of the stored codes (default: the SAE's)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated layers, e.g. 20 or 10,20,30"),
    dataset: Optional[str] = typer.Option(None, help="'popqa-demo', a .jsonl/.json/.tsv/.txt file, or a cached HF dataset"),
    store: Optional[str] = typer.Option(None, help="lake URL: a path, s3://bucket/x.zarr, ..."),
    samples: Optional[int] = typer.Option(None, help="completions per question (default 20)"),
    limit: Optional[int] = typer.Option(None, help="only the first N questions"),
    max_new_tokens: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    mode: Optional[str] = typer.Option(None, help="resume (default), overwrite, create"),
    shards_per_task: int = typer.Option(4, help="shards per Prefect task"),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Sample completions and capture residuals + SAE codes into a question lake."""
    from qsae.capture import CaptureConfig, run_capture

    cfg = build_config(CaptureConfig, config, set_, model=model, sae=sae, sae_k=sae_k, layers=parse_layers(layers),
                       dataset=dataset, store=store, n_samples=samples, limit=limit,
                       max_new_tokens=max_new_tokens, device=device, mode=mode)
    if prefect:
        _prefect_env()
        from flows.capture import capture_flow

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
    """The embedded default: SmolLM2-135M + its TopK SAE (trained once) on real PopQA questions."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsae.capture import run_capture, store_path_for
    from qsae.demo import demo_capture_config, ensure_demo_sae

    sae = ensure_demo_sae(log_fn=typer.echo)
    cfg = demo_capture_config(store, sae, questions)
    cfg = cfg.model_copy(update={"store": store_path_for(cfg)})
    typer.echo(f"capturing {questions} PopQA questions x {cfg.n_samples} samples through SmolLM2 layer "
               f"{cfg.layers} and {sae} into {cfg.store}")
    if prefect:
        _prefect_env()
        from flows.capture import capture_flow

        result = capture_flow(config=cfg, shards_per_task=1)
        typer.echo(f"{result['done']} of {result['n_questions']} questions done")
    else:
        run_capture(cfg, typer.echo, progress=True)
    _echo_open(cfg.store)


@app.command()
def collect(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None),
    dataset: Optional[str] = typer.Option(None, help="'wiki-demo', a .txt/.jsonl file or a cached HF dataset"),
    layers: Optional[str] = typer.Option(None),
    hook: Optional[str] = typer.Option(None, help="resid_post or mlp_out"),
    store: Optional[str] = typer.Option(None),
    max_tokens: Optional[int] = typer.Option(None),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Stream a text corpus through a model into a token lake (for SAE training)."""
    from qsae.collect import CollectConfig
    from qsae.collect import collect as run

    cfg = build_config(CollectConfig, config, set_, model=model, dataset=dataset, layers=parse_layers(layers),
                       hook=hook, store=store, max_tokens=max_tokens)
    if prefect:
        _prefect_env()
        from flows.train import collect_flow

        typer.echo(collect_flow(config=cfg))
    else:
        lake = run(cfg, typer.echo, progress=True)
        typer.echo(f"{lake.n_units} tokens in {lake.url}")


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    store: Optional[str] = typer.Option(None, help="token lake to train from"),
    layer: Optional[int] = typer.Option(None),
    architecture: Optional[str] = typer.Option(None, help="topk or relu"),
    k: Optional[int] = typer.Option(None),
    out: Optional[str] = typer.Option(None, help="output SAELens folder"),
    epochs: Optional[float] = typer.Option(None),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Train a TopK or ReLU+L1 SAE from a token lake; writes a SAELens folder."""
    from qsae.train import TrainConfig, train_sae

    cfg = build_config(TrainConfig, config, set_, store=store, layer=layer, architecture=architecture, k=k,
                       out=out, epochs=epochs)
    if prefect:
        _prefect_env()
        from flows.train import train_flow

        typer.echo(train_flow(config=cfg))
    else:
        res = train_sae(cfg, progress=True)
        typer.echo(json.dumps({"out": str(res.out), **res.final}, indent=1))


@app.command()
def rivalry(
    store: str = typer.Argument(..., help="question lake URL"),
    config: Optional[Path] = ConfigOpt,
    layer: Optional[int] = typer.Option(None),
    mode: Optional[str] = typer.Option(None, help="per_question (default) or across_questions"),
    rule: Optional[str] = typer.Option(None, help="median (default), quantile, threshold"),
    entropy: Optional[str] = typer.Option(None, help="exact (default) or sampled"),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Feature rivalry: entropy groups, per-question feature correlations, Mann-Whitney U."""
    from qsae.results import summary_json
    from qsae.rivalry_study import RivalryConfig, run_rivalry

    cfg = build_config(RivalryConfig, config, set_, store=store, layer=layer, mode=mode, rule=rule, entropy=entropy)
    if prefect:
        _prefect_env()
        from flows.rivalry import rivalry_flow

        out = rivalry_flow(config=cfg)
        summary, group, figure = out["summary"], out["group"], out["figure"]
    else:
        res = run_rivalry(cfg, typer.echo, progress=True)
        summary, group, figure = res.summary, res.group, res.figure
    typer.echo(summary_json(summary["test"]))
    typer.echo(f"results: {store} group {group!r}; figure: {figure}")


@app.command()
def reconstruct(
    store: str = typer.Argument(..., help="question lake URL"),
    config: Optional[Path] = ConfigOpt,
    layers: Optional[str] = typer.Option(None),
    model_in_loop: Optional[bool] = typer.Option(None, "--model-in-loop/--offline", help="also CE loss recovered"),
    sae: Optional[str] = typer.Option(None, help="SAE source if it moved (hash checked)"),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """SAEBench-style reconstruction metrics per layer (offline; optionally with the model)."""
    from qsae.reconstruction_study import ReconstructionConfig, run_reconstruction

    cfg = build_config(ReconstructionConfig, config, set_, store=store, layers=parse_layers(layers),
                       model_in_loop=model_in_loop, sae=sae)
    if prefect:
        _prefect_env()
        from flows.reconstruction import reconstruction_flow

        out = reconstruction_flow(config=cfg)
        rows, figure = out["rows"], out["figure"]
    else:
        res = run_reconstruction(cfg, typer.echo)
        rows = [{k: float(res.table[k].sel(layer=layer)) for k in res.table.data_vars if k != "feature_density"}
                for layer in res.table.layer.values]
        figure = res.figure
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
    from qsae.verify import verify as run

    report = run(store, reencode=reencode)
    typer.echo(report.to_json() if as_json else report.text())
    raise typer.Exit(code=0 if report.ok else 1)


@app.command()
def inspect(
    store: str = typer.Argument(..., help="lake URL"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Summarise a store: dims, variables (dtype, size, layout), done fraction, lineage, results."""
    from qsae.inspect_store import inspect_store, render

    info = inspect_store(store)
    typer.echo(json.dumps(info, indent=1) if as_json else render(info))


@app.command()
def compare(
    base_sae: str = typer.Option(..., help="SAE of the base model"),
    finetuned_sae: str = typer.Option(..., help="SAE of the fine-tuned model (may be the same SAE)"),
    layer: Optional[int] = typer.Option(None),
    base_lake: Optional[str] = typer.Option(None, help="question lake captured on the base model"),
    finetuned_lake: Optional[str] = typer.Option(None, help="question lake captured on the fine-tuned model"),
    out: Optional[str] = typer.Option(None, help="store for the results (default: the fine-tuned lake)"),
    threshold: Optional[float] = typer.Option(None, help="emerged/vanished below this cosine (default 0.7)"),
    prefect: bool = PrefectOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Match two SAEs' features (decoder cosine, optimal assignment) and their firing in two lakes."""
    from qsae.compare_study import CompareConfig, run_compare
    from qsae.results import summary_json

    cfg = build_config(CompareConfig, None, set_, base_sae=base_sae, finetuned_sae=finetuned_sae, layer=layer,
                       base_lake=base_lake, finetuned_lake=finetuned_lake, out=out, threshold=threshold)
    if prefect:
        _prefect_env()
        from flows.compare import compare_flow

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
    from qsae.demo_compare import build_and_compare
    from qsae.results import summary_json

    res, baseline = build_and_compare(finetune_steps=steps, questions=questions, log_fn=typer.echo)
    keys = ("matched", "matched_above_0.9", "emerged", "vanished", "mean_matched_similarity")
    typer.echo("control (base SAE vs itself continued on base activations): " + json.dumps({k: baseline[k] for k in keys}))
    typer.echo("base SAE vs itself continued on fine-tuned activations: " + json.dumps({k: res.summary[k] for k in keys}))
    typer.echo(summary_json({k: v for k, v in res.summary.items() if k != "emerged_examples"}))
    typer.echo(f"figure: {res.figure}")


if __name__ == "__main__":  # python -m flows.cli
    app(prog_name="qsae")
