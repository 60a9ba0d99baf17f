"""Check a question lake against its schema and its own invariants (``qsae verify``).

Every question marked done must have: finite residuals unless flagged non-finite, clipped
values only where overflow is counted, norms that match, TopK indices within d_sae, unique
and sorted ascending per row, non-negative code values, completions consistent with their
token ids, entropies within [0, log V] and [0, log S]. Lineage attributes must be present;
every result group decodes and records the lake state it was computed from. The checks that
need the model's tokenizer or the SAE's files are ``qsae.jobs.verify``'s. Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsae.errors import QsaeError
from qsae.lake.integrity import find_damage, undone_with_data
from qsae.lake.schema import FP16_MAX
from qsae.lake.storage import StoreRef
from qsae.lake.store import STORES_EVERY_CHUNK, QuestionLake, open_lake


@dataclass
class Report:
    store: str
    problems: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # states that may be legitimate: said, not failed

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, msg: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(msg)

    def to_json(self) -> str:
        return json.dumps({"store": self.store, "ok": self.ok, "problems": self.problems, "warnings": self.warnings,
                           "checks": self.checks}, indent=1)

    def text(self) -> str:
        lines = [f"store: {self.store}", f"status: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        lines += [f"  {k}: {v}" for k, v in self.checks.items()]
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _where(qids: np.ndarray, mask: np.ndarray, limit: int = 5) -> str:
    bad = np.unique(np.nonzero(mask)[0])
    return f"questions {[int(q) for q in qids[bad[:limit]]]}{' ...' if bad.size > limit else ''} ({bad.size} in all)"


def _check_block(ds, b: slice, report: Report, attrs: dict, vocab_log: float | None) -> int:
    sel = ds.isel(question=b).load()
    done = sel.done.values
    if not done.any():
        return 0
    d = sel.isel(question=np.flatnonzero(done))
    qids = d.question.values
    has_codes = "codes_idx" in d
    fp16 = attrs["resid_dtype"] == "float16"
    for var, nonfinite, overflow, norm in (("resid", "resid_nonfinite", "resid_overflow", "resid_norm"),
                                           ("resid_prompt", "resid_prompt_nonfinite", "resid_prompt_overflow",
                                            "resid_prompt_norm")):
        x = d[var].values.astype(np.float32)
        # layer first; move the question axis first for _where
        bad_finite = (~np.isfinite(x)).sum(-1) != d[nonfinite].values
        if bad_finite.any():
            report.fail(f"{var}: non-finite values not matching {nonfinite} in {_where(qids, np.moveaxis(bad_finite, 0, 1))}")
        clipped = (np.abs(x) >= FP16_MAX).sum(-1) if fp16 else np.zeros(x.shape[:-1])
        bad_over = clipped < d[overflow].values
        if bad_over.any():
            report.fail(f"{var}: {overflow} counts more clipped values than stored in {_where(qids, np.moveaxis(bad_over, 0, 1))}")
        ok = (d[nonfinite].values == 0) & (d[overflow].values == 0)
        n = np.linalg.norm(np.where(np.isfinite(x), x, 0), axis=-1)
        rel = np.abs(n - d[norm].values) / np.maximum(np.abs(d[norm].values), 1e-6)
        tol = 2e-3 if fp16 else 1e-4
        bad_norm = ok & ~(rel <= tol)
        if bad_norm.any():
            report.fail(f"{norm} does not match the stored {var} in {_where(qids, np.moveaxis(bad_norm, 0, 1))}")
    if has_codes:
        for idx_name, val_name in (("codes_idx", "codes_val"), ("prompt_codes_idx", "prompt_codes_val")):
            idx = d[idx_name].values.astype(np.int64)
            val = d[val_name].values
            qfirst = lambda m: np.moveaxis(m, 0, 1)  # noqa: E731
            if (idx >= attrs["d_sae"]).any() or (idx < 0).any():
                report.fail(f"{idx_name}: indices outside 0..{attrs['d_sae'] - 1} in {_where(qids, qfirst((idx >= attrs['d_sae']).any(-1)))}")
            unsorted = (np.diff(idx, axis=-1) <= 0).any(-1)
            if unsorted.any():
                report.fail(f"{idx_name}: rows not strictly ascending (duplicates or unsorted) in {_where(qids, qfirst(unsorted))}")
            # Qwen-Scope keeps its top-k values as they are: negative values are legitimate there
            # (counted), never for ReLU'd codes.
            relu = attrs.get("sae_topk_relu") or {}
            raw = np.array([relu.get(str(int(layer)), True) is False for layer in d.layer.values])
            neg = (val < 0).any(-1)  # (layer, question[, sample])
            key = f"{val_name}_rows_with_negative_values"
            report.checks[key] = report.checks.get(key, 0) + int(neg.sum())
            bad = ~np.isfinite(val).all(-1) | (neg & ~raw.reshape((-1,) + (1,) * (neg.ndim - 1)))
            if bad.any():
                report.fail(f"{val_name}: negative or non-finite code values in {_where(qids, qfirst(bad))}")
    lens = d.completion_len.values
    ids = d.completion_ids.values
    T = ids.shape[-1]
    if ((lens < 1) | (lens > T)).any():
        report.fail(f"completion_len outside 1..{T} in {_where(qids, (lens < 1) | (lens > T))}")
    pos = np.arange(T)
    inside = pos < lens[..., None]
    bad_ids = np.where(inside, ids < 0, ids != -1).any(-1)
    if bad_ids.any():
        report.fail(f"completion_ids not padded with -1 exactly after completion_len in {_where(qids, bad_ids)}")
    if (d.first_token.values != ids[..., 0]).any():
        report.fail(f"first_token differs from completion_ids[..., 0] in {_where(qids, d.first_token.values != ids[..., 0])}")
    ent, sent = d.entropy.values, d.sample_entropy.values
    S = d.sizes["sample"]
    if not np.isfinite(ent).all() or (ent < -1e-9).any() or (vocab_log is not None and (ent > vocab_log + 1e-6).any()):
        report.fail(f"entropy outside [0, log V] in {_where(qids, ~((ent >= -1e-9) & np.isfinite(ent)))}")
    if (sent < -1e-9).any() or (sent > math.log(S) + 1e-9).any():
        report.fail(f"sample_entropy outside [0, log S] in {_where(qids, (sent < -1e-9) | (sent > math.log(S) + 1e-9))}")
    if "nucleus_entropy" in d:  # renormalising the nucleus can raise or lower entropy: only its range
        nent = d.nucleus_entropy.values
        bad = ~np.isfinite(nent) | (nent < -1e-9) | ((nent > vocab_log + 1e-6) if vocab_log is not None else False)
        if bad.any():
            report.fail(f"nucleus_entropy outside [0, log V] in {_where(qids, bad)}")
    lp = d.first_logprob.values
    if not (np.isfinite(lp) & (lp <= 1e-6)).all():
        report.fail(f"first_logprob not a finite log-probability in {_where(qids, ~(np.isfinite(lp) & (lp <= 1e-6)))}")
    for i, a in enumerate(d.answers.values):
        try:
            json.loads(str(a))
        except json.JSONDecodeError:
            report.fail(f"answers of question {qids[i]} is not JSON")
            break
    if any(len(str(t)) == 0 for t in d.question_text.values):
        report.fail("empty question_text on a done question")
    return int(done.sum())


def verify_lake(target: str | StoreRef, storage_options: dict | None = None, block_questions: int = 512) -> Report:
    """Verify a lake from its own bytes: every object done questions need is there and decodes
    (crc32c), the invariants, every result group. What needs the model's tokenizer or the SAE's
    files (``qsae.jobs.verify``) is added by the job. Never raises for a damaged lake: every
    finding is in the report."""
    ref = StoreRef.of(target, storage_options)
    report = Report(ref.url)
    try:
        lake = QuestionLake.open(ref)
        ds = open_lake(ref, check=False)
    except QsaeError as exc:
        report.fail(f"{type(exc).__name__}: {exc}")
        return report
    attrs = dict(ds.attrs)
    damage = find_damage(lake, decode=True)
    for d in damage:
        report.fail(str(d))
    report.checks["damaged_objects"] = len(damage)
    report.checks["checksums"] = ("crc32c on every stored chunk, every chunk stored" if attrs.get(STORES_EVERY_CHUNK)
                                  else "none (lake written before qsae 0.2): decoding checked, missing all-fill "
                                       "chunks cannot be told from lost ones")
    pending_with_data = undone_with_data(lake)
    if pending_with_data:  # an interrupted capture looks exactly like a lost `done` object: said, not failed
        report.warnings.append(f"shards {pending_with_data}: all data written but not marked done: an interrupted "
                               "capture (rerun it with the same config to finish) or a lost `done` object; the "
                               "analyses leave these questions out and say so")
    report.checks["shards_with_data_not_done"] = pending_with_data
    n = ds.sizes["question"]
    report.checks.update(questions=n, layers=[int(x) for x in ds.layer.values],
                         shards_pending=len(lake.pending_shards()))
    if damage:
        report.checks["content_checks"] = "skipped: damaged objects must be restored or recaptured first"
        return report
    done_total = 0
    vocab = attrs.get("vocab_size")
    vocab_log = math.log(vocab) if vocab else None
    for start in range(0, n, block_questions):
        done_total += _check_block(ds, slice(start, min(start + block_questions, n)), report, attrs, vocab_log)
    report.checks["done"] = done_total
    _check_results(ref, lake, report)
    return report


def _check_results(ref: StoreRef, lake: QuestionLake, report: Report) -> None:
    """Every result group proves itself as the lake does: every chunk there and decoding
    (crc32c), and the lake state it was computed from equal to the lake's now (a stale one is
    said, not failed: its readers refuse it until the analysis is rerun)."""
    import zarr

    from qsae.lake.results import LakeState, lake_state, result_damage, result_groups

    now = lake_state(lake)
    status: dict[str, str] = {}
    for group in result_groups(lake.group):
        damage = result_damage(ref, group)
        if damage:
            report.fail(f"result group {group}: {damage[0]}" + (f" (and {len(damage) - 1} more)" if len(damage) > 1
                                                                else ""))
            status[group] = "damaged"
            continue
        grp = zarr.open_group(store=(ref / group).zarr_store(read_only=True), mode="r", zarr_format=3,
                              use_consolidated=False)
        try:
            for name, arr in grp.arrays():
                arr[...]  # every chunk decoded: checksums where it has them
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode is a finding
            report.fail(f"result group {group}: {name} does not decode ({type(exc).__name__}: {exc})")
            status[group] = "damaged"
            continue
        rec = dict(grp.attrs).get("lake_state")
        why = LakeState.from_record(rec).stale_reason(now) if rec else "it records no lake state (an older qsae)"
        status[group] = "ok" if why is None else "stale" if rec else "unchecked"
        if why:
            report.warnings.append(f"result group {group}: {why}; readers refuse it until its analysis is rerun")
    report.checks["result_groups"] = status
