"""``qsae verify``: the lake's own checks (``qsae.lake.verify``) and those that need the model's
tokenizer (completions against their token ids) or the SAE's files (hashes, re-encoding stored
rows): a job, since the lake imports neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsae.errors import QsaeError
from qsae.jobs.codes import load_sae_for
from qsae.lake.storage import StoreRef
from qsae.lake.store import open_lake
from qsae.lake.verify import Report, verify_lake


def verify(target: str | StoreRef, storage_options: dict | None = None, reencode: int = 0, seed: int = 0,
           block_questions: int = 512, completions: bool = True) -> Report:
    """Verify a lake: its own checks, then ``completions`` decoded with the model's tokenizer when
    it is at hand, the SAE files' hashes when they are, and ``reencode`` random stored rows per
    layer (completion and prompt codes) re-encoded with the SAE. Never raises for a damaged lake:
    every finding is in the report."""
    ref = StoreRef.of(target, storage_options)
    report = verify_lake(ref, block_questions=block_questions)
    if "done" not in report.checks:  # it did not open, or is damaged: nothing more to ask of it
        return report
    ds = open_lake(ref, check=False)
    attrs = dict(ds.attrs)
    if completions:
        _check_completions(ds, attrs, report, block_questions)
    _check_sae_files(attrs, report, ds, reencode, seed)
    return report


def _tokenizer_for(attrs: dict):
    """The lake's model tokenizer when it is available locally (never downloaded), else why not."""
    name = attrs.get("model_path") or attrs.get("model")
    try:
        from transformers import AutoTokenizer

        from qsae.lm.locate import EMBEDDED

        if name in EMBEDDED:  # the converted copy if there is one, else the GGUF file's own tokenizer
            from qsae.lm.locate import default_cache_dir, embedded_package_dir

            folder = default_cache_dir() / "models" / name
            if (folder / "qsae_revision.txt").exists():
                return AutoTokenizer.from_pretrained(folder), None
            package, gguf_file, _ = EMBEDDED[name]
            return AutoTokenizer.from_pretrained(embedded_package_dir(package), gguf_file=gguf_file), None
        return AutoTokenizer.from_pretrained(name, local_files_only=True), None
    except Exception as exc:  # noqa: BLE001 - a tokenizer we cannot load only skips this check
        return None, f"tokenizer of {name!r} not at hand ({type(exc).__name__}): completions not compared"


def _check_completions(ds, attrs: dict, report: Report, block: int) -> None:
    """``completion`` must be the decoded ``completion_ids`` exactly as capture made it."""
    tok, why = _tokenizer_for(attrs)
    if tok is None:
        report.checks["completions"] = why
        return
    stop_nl = bool((attrs.get("sampling") or {}).get("stop_at_newline", True))
    n, checked, bad = ds.sizes["question"], 0, []
    for start in range(0, n, block):
        sel = ds[["done", "completion", "completion_ids", "completion_len"]].isel(question=slice(start, start + block)).load()
        for qi in np.flatnonzero(sel.done.values):
            for si in range(sel.sizes["sample"]):
                ids = sel.completion_ids.values[qi, si, : int(sel.completion_len.values[qi, si])]
                text = tok.decode(ids.tolist(), skip_special_tokens=True)
                text = (text.split("\n")[0] if stop_nl else text).strip()
                checked += 1
                if text != str(sel.completion.values[qi, si]):
                    bad.append(int(sel.question.values[qi]))
    report.checks["completions_compared"] = checked
    if bad:
        ids = sorted(set(bad))
        report.fail(f"completion differs from its decoded completion_ids in {len(bad)} samples (questions "
                    f"{ids[:5]}{' ...' if len(ids) > 5 else ''})")


def _check_sae_files(attrs: dict, report: Report, ds, reencode: int, seed: int) -> None:
    if attrs.get("d_sae") is None:
        report.checks["sae"] = "no SAE codes in this lake"
        return
    source = attrs.get("sae_source")
    if not source or not Path(str(source)).exists():
        report.checks["sae"] = f"SAE files not at hand ({source}): hashes not checked"
        return
    checked = []
    for layer in [int(x) for x in ds.layer.values]:
        try:
            sae = load_sae_for(attrs, layer)
        except QsaeError as exc:
            report.fail(f"layer {layer}: {exc}")
            continue
        checked.append(layer)
        if reencode:
            _reencode(ds, layer, sae, reencode, seed, report)
    report.checks["sae_hashes_verified_layers"] = checked


def _reencode(ds, layer: int, sae, n: int, seed: int, report: Report) -> None:
    """Re-encode ``n`` random stored completion-end rows and ``n`` prompt-end rows with the SAE;
    the stored codes must be the TopK of the stored residual."""
    import torch

    done = np.flatnonzero(ds.done.values)
    if done.size == 0:
        return
    rng = np.random.default_rng(seed)
    S = ds.sizes["sample"]
    k = ds.sizes["k"]
    picks = rng.choice(done.size * S, size=min(n, done.size * S), replace=False)
    rows = [("completion", int(done[p // S]), int(p % S)) for p in picks]
    rows += [("prompt", int(q), None) for q in rng.choice(done, size=min(n, done.size), replace=False)]
    sub = ds[["resid", "codes_idx", "codes_val", "resid_nonfinite", "resid_prompt", "prompt_codes_idx",
              "prompt_codes_val", "resid_prompt_nonfinite"]].sel(layer=layer)
    matched = {"completion": 0, "prompt": 0}
    for where, qi, si in rows:
        if where == "completion":
            row = sub[["resid", "codes_idx", "codes_val", "resid_nonfinite"]].isel(question=qi, sample=si).load()
            x, idx_s, val_s, nonfinite = row.resid, row.codes_idx, row.codes_val, row.resid_nonfinite
        else:
            row = sub[["resid_prompt", "prompt_codes_idx", "prompt_codes_val", "resid_prompt_nonfinite"]].isel(
                question=qi).load()
            x, idx_s, val_s, nonfinite = row.resid_prompt, row.prompt_codes_idx, row.prompt_codes_val, \
                row.resid_prompt_nonfinite
        if int(nonfinite) > 0:
            continue
        idx, val = sae.encode_topk(torch.from_numpy(x.values.astype(np.float32))[None], k=k)
        if np.array_equal(idx[0].numpy(), idx_s.values.astype(np.int64)) and \
                np.allclose(val[0].numpy(), val_s.values, rtol=1e-4, atol=1e-5):
            matched[where] += 1
        else:
            at = f"sample {si}" if si is not None else "prompt end"
            report.fail(f"layer {layer}, question {int(ds.question[qi])}, {at}: stored codes differ from "
                        "re-encoding the stored activation with the SAE")
    key = "reencoded_rows_matching"
    report.checks.setdefault(key, {})[str(layer)] = {w: f"{matched[w]} of {sum(r[0] == w for r in rows)}"
                                                     for w in matched}
