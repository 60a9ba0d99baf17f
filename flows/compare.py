"""The compare flow: match two SAEs' features, measure firing shifts, publish the results."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.logs import forward_qsae_logs
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.compare import CompareConfig, run_compare

forward_qsae_logs()  # the jobs' log lines in each run's logs


def summary_markdown(result) -> str:
    s = result.summary
    lines = [f"# Base vs fine-tuned features (layer {s['layer']})", "",
             "| matched | matched > 0.9 | emerged | vanished | threshold | mean matched similarity |",
             "|---|---|---|---|---|---|",
             f"| {s['matched']} | {s['matched_above_0.9']} | {s['emerged']} | {s['vanished']} | {s['threshold']} | "
             f"{s['mean_matched_similarity']:.3f} |", ""]
    if "largest_shifts" in s:
        lines += ["Largest firing-frequency shifts among matched features:", "",
                  "| base | fine-tuned | similarity | freq base | freq fine-tuned |", "|---|---|---|---|---|"]
        lines += [f"| {r['base']} | {r['finetuned']} | {r['similarity']:.3f} | {r['base_frequency']:.4f} | "
                  f"{r['finetuned_frequency']:.4f} |" for r in s["largest_shifts"]]
    for ex in s.get("emerged_examples", [])[:5]:
        top = ex["top"][0] if ex["top"] else {}
        lines.append(f"- emerged feature {ex['feature']} (fires on {100 * ex['frequency']:.1f}% of samples), most on: "
                     f"“{top.get('question_text', '')}” → “{top.get('completion', '')}”")
    if result.figure:
        lines += ["", f"figure: `{result.figure}`"]
    return "\n".join(lines)


@flow(name="qsae-compare", log_prints=True)
def compare_flow(config: CompareConfig) -> dict[str, Any]:
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    result = run_compare(config)
    create_markdown_artifact(key="qsae-compare", markdown=summary_markdown(result), description="SAE feature comparison")
    return {"group": result.group, "figure": result.figure, "summary": result.summary}
