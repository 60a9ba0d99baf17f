"""Capture: sampled completions, entropies, residuals and TopK SAE codes into a question lake.

The stored activation is the lake's ``hook``: the residual after each layer (``resid_post``),
or that layer's MLP output (``mlp_out``, what the 9B release's SAE reads); the variables keep
the names ``resid``/``resid_prompt`` either way and the lake's ``hook`` attribute says which.

For each batch of questions (``qsae.lm.generate``): each prompt is prefilled once, which gives
the prompt's last-token activations and the exact first-step entropy; its cache is expanded to
the S samples, which decode with the seeded sampler (``qsae.lm.sampling``); each finished row
is fed its last token once more, which captures the completion's last-token activation, and
leaves the batch. (``decode="two_pass"``: the reference path, ``generate`` then one hooked
forward over prompt + completion.) Residuals are converted to the lake dtype on the device
(float16 overflow clipped and counted), SAE codes are the TopK of the stored residual,
computed on the device; only (k indices, k values) ever reach the host. A shard is handed
to a bounded background writer while the model works on the next one.

Plain functions, no Prefect: ``run_capture(CaptureConfig(...))`` works in a notebook; the
flow in ``flows/capture.py`` maps ``capture_shards`` over shards.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from qsae.errors import DatasetError, SAEFormatError
from qsae.jobs import interrupt
from qsae.jobs.configs import CaptureConfig
from qsae.jobs.models import Shared, shared_model
from qsae.jobs.preflight import preflight
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.schema import ROW_FIELDS, VARIABLES_BY_NAME
from qsae.lake.store import LakeLayout, LakeSpec, QuestionLake
from qsae.lake.writer import background_writer
from qsae.lm.convert import to_lake_dtype
from qsae.lm.datasets import Question, QuestionSet, format_prompt, is_correct, load_questions
from qsae.lm.generate import Draw, sample_and_capture
from qsae.lm.hooks import check_layers, text_config
from qsae.lm.memory import auto_questions_per_batch
from qsae.lm.models import LoadedModel
from qsae.lm.sampling import SAMPLER_ID, empirical_entropy, newline_token_ids
from qsae.sae.formats import load_saes
from qsae.sae.model import SAE, check_sae_matches_model

log = logging.getLogger("qsae.jobs.capture")




def capture_lineage(cfg: CaptureConfig, lm_name: str, lm_revision: str, qs: QuestionSet,
                    saes: dict[int, SAE]) -> dict[str, Any]:
    """What the lake records of a capture run (its identity keys among them)."""
    return {
        "model": lm_name,
        "model_path": cfg.model,
        "model_revision": lm_revision,
        "hook": cfg.hook or cfg.resolved_hook(saes),
        "sae_source": cfg.sae,
        "sae_sha256": {str(layer): sae.info.sha256 for layer, sae in saes.items()},
        # per layer: are the top-k values ReLU'd (SAELens, OpenAI-style) or kept as they are (Qwen-Scope)
        "sae_topk_relu": {str(layer): sae.info.activation == "relu" or sae.info.topk_relu
                          for layer, sae in saes.items()},
        "dataset": qs.name,
        "dataset_revision": qs.revision,
        "sampling": {
            "n_samples": cfg.sampling.n_samples, "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
            "max_new_tokens": cfg.sampling.max_new_tokens, "stop_at_newline": cfg.sampling.stop_at_newline,
            "sampler": SAMPLER_ID,
        },
        "seed": cfg.seed,
        "prompt_template": cfg.prompt_template,
    }


# ------------------------------------------------------------------ shared resources
def get_model(cfg: CaptureConfig) -> Shared:
    """The process-wide model for a config, with the lock that serialises its use (hooks)."""
    return shared_model(cfg.model, cfg.model_revision, cfg.device, cfg.dtype, cfg.trust_remote_code)


@lru_cache(maxsize=4)
def _saes(source: str, layers: tuple[int, ...], k: int | None, device: str) -> dict[int, SAE]:
    return load_saes(source, list(layers), k=k, device=device)


def get_saes(cfg: CaptureConfig, lm: LoadedModel) -> dict[int, SAE]:
    """The SAEs for the requested layers on the model's device, checked against the model."""
    if cfg.sae is None:
        return {}
    saes = _saes(cfg.sae, tuple(cfg.layers), cfg.sae_k, str(lm.device))
    for sae in saes.values():
        check_sae_matches_model(sae, lm.d_model, lm.name)
    cfg.resolved_hook(saes)  # one hook point for every layer, agreeing with the config
    widths = {(s.d_sae, cfg.sae_k or s.k) for s in saes.values()}
    if len(widths) != 1 or None in next(iter(widths)):
        raise SAEFormatError(f"all layers' SAEs need one d_sae and a k for the codes, got (d_sae, k) {sorted(widths, key=str)}")
    return saes


@lru_cache(maxsize=4)
def _questions(dataset: str, split: str, on_bad_row: str, limit: int | None) -> QuestionSet:
    return load_questions(dataset, on_error=on_bad_row, limit=limit, split=split)  # type: ignore[arg-type]


def get_questions(cfg: CaptureConfig) -> QuestionSet:
    return _questions(cfg.dataset, cfg.dataset_split, cfg.on_bad_row, cfg.limit)


# ------------------------------------------------------------------------- planning
@dataclass
class CapturePlan:
    """Everything decided once, before any shard: the config as the steps read it (the store's
    absolute path, the hook point resolved against the SAEs), the prompt budget, the lake and
    its pending shards. ``capture_shards`` takes it; the model and SAEs it names are loaded once
    per process (``get_model``, ``get_saes``)."""

    config: CaptureConfig
    lake: QuestionLake
    questions: QuestionSet
    pending: list[int]
    budget: int
    long_prompts: list[int] = field(default_factory=list)


def prompt_budget(cfg: CaptureConfig, lm: LoadedModel) -> int:
    """How many prompt tokens a question may use: ``max_prompt_tokens`` (default 512: one
    over-long row must not cost 50x silently), never more than context - max_new_tokens."""
    ctx = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None) or 4096
    room = int(ctx) - cfg.sampling.max_new_tokens
    return room if cfg.max_prompt_tokens is None else min(cfg.max_prompt_tokens, room)


def plan_capture(cfg: CaptureConfig) -> CapturePlan:
    """Load the dataset, model and SAEs, check them against each other, create/open the store."""
    preflight(cfg)  # what needs nothing loaded first (a deployment run fails in a second, not after the model)
    cfg = cfg.model_copy(update={"store": cfg.ref.absolute})  # every worker and result names one path
    qs = get_questions(cfg)
    for p in qs.problems:
        log.info("dataset %s: skipped %s", qs.name, p)
    res = get_model(cfg)
    lm = res.lm
    check_layers(lm.model, cfg.layers)
    saes = get_saes(cfg, lm)
    cfg = cfg.model_copy(update={"hook": cfg.resolved_hook(saes)})  # decided here, read as it is from now on
    budget = prompt_budget(cfg, lm)
    long = [q.id for q in qs.questions if len(_encode_prompt(lm, cfg, q)) > budget]
    if long and cfg.on_long_prompt == "refuse":
        raise DatasetError(f"{len(long)} prompts are longer than {budget} tokens (ids {long[:10]}); "
                           "set on_long_prompt='truncate' to cut them from the left")
    if long:
        log.warning("%d prompts are longer than %d tokens and are cut from the left (ids %s%s); "
                    "on_long_prompt='refuse' refuses them, max_prompt_tokens sets the budget", len(long), budget,
                    long[:10], " ..." if len(long) > 10 else "")
    any_sae = next(iter(saes.values()), None)
    spec = LakeSpec(
        question_ids=qs.ids(), dataset_ids=qs.dataset_ids(), layers=cfg.layers, n_samples=cfg.sampling.n_samples, d_model=lm.d_model,
        max_new_tokens=cfg.sampling.max_new_tokens,
        d_sae=any_sae.d_sae if any_sae else None, k=(cfg.sae_k or any_sae.k) if any_sae else None,
        resid_dtype=cfg.resid_dtype, layout=LakeLayout(cfg.questions_per_shard, cfg.questions_per_chunk),
        lineage={**capture_lineage(cfg, lm.name, lm.revision, qs, saes),
                 "vocab_size": int(lm.model.config.get_text_config().vocab_size),
                 # provenance, not identity: how the draws were computed (the same draws either way)
                 "decode": {"path": cfg.decode, "experts": decode_experts(lm, cfg.decode),
                            "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")}},
    )
    lake = QuestionLake.open_or_create(cfg.ref, spec, mode=cfg.mode)
    if qs.problems and "dataset_problems" not in lake.attrs:
        lake.update_attrs(dataset_problems=[str(p) for p in qs.problems])
    return CapturePlan(cfg, lake, qs, lake.pending_shards(), budget, long)


def _encode_prompt(lm: LoadedModel, cfg: CaptureConfig, q: Question) -> list[int]:
    return lm.tokenizer(format_prompt(cfg.prompt_template, q), add_special_tokens=True).input_ids


# ------------------------------------------------------------------------ one batch
@dataclass
class BatchResult:
    """Everything one batch of questions contributes to its shard (numpy, host memory)."""

    arrays: dict[str, np.ndarray]
    new_tokens: int
    prompt_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)  # prefill / decode (or generate / forward) / encode


def capture_batch(
    lm: LoadedModel, saes: dict[int, SAE], questions: Sequence[Question], cfg: CaptureConfig, budget: int,
) -> BatchResult:
    """Sample, measure and capture one batch of questions (all S samples each)."""
    tok = lm.tokenizer
    S, B, T = cfg.sampling.n_samples, len(questions), cfg.sampling.max_new_tokens
    prompts, truncated = [], np.zeros(B, bool)
    for i, q in enumerate(questions):
        ids = _encode_prompt(lm, cfg, q)
        if len(ids) > budget:
            ids, truncated[i] = ids[-budget:], True
        prompts.append(ids)
    plen = np.array([len(p) for p in prompts])
    eos = tok.eos_token_id
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    stop = torch.tensor(eos_ids, dtype=torch.long)
    if cfg.sampling.stop_at_newline:
        stop = torch.unique(torch.cat([newline_token_ids(tok), stop]))
    draw = Draw(n_samples=S, seed=cfg.seed, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                max_new_tokens=T, stop_ids=stop, pad_id=tok.pad_token_id)
    sampled = sample_and_capture(cfg.decode, lm.model, prompts, [q.id for q in questions], draw, cfg.layers,
                                 cfg.hook or cfg.resolved_hook(saes),
                                 **({"eos_token_id": eos, "bos_token_id": tok.bos_token_id}
                                    if cfg.decode == "two_pass" else {}))
    t_model = time.perf_counter()
    R = B * S
    lengths = sampled.lengths
    texts = np.empty(R, dtype=object)
    for r in range(R):
        text = tok.decode(sampled.tokens[r, :lengths[r]].tolist(), skip_special_tokens=True)
        texts[r] = (text.split("\n")[0] if cfg.sampling.stop_at_newline else text).strip()
    arrays = _layer_arrays(sampled.prompt_acts, sampled.completion_acts, saes, cfg, B, S)
    first_token = sampled.first_token.reshape(B, S).astype(np.int32)
    correct = np.array([is_correct(texts[r], questions[r // S].answers) for r in range(R)]).reshape(B, S)
    arrays.update(
        entropy=sampled.entropy,
        sample_entropy=np.array([empirical_entropy(first_token[i]) for i in range(B)]),
        nucleus_entropy=sampled.nucleus_entropy,
        first_token=first_token,
        first_logprob=sampled.first_logprob.reshape(B, S),
        completion=texts.reshape(B, S).astype(str),
        completion_ids=sampled.tokens.reshape(B, S, T),
        completion_len=lengths.reshape(B, S),
        correct=correct,
        question_text=np.array([q.question for q in questions], dtype=str),
        answers=np.array([json.dumps(list(q.answers), ensure_ascii=False) for q in questions], dtype=str),
        prompt_len=plen.astype(np.int32),
        prompt_truncated=truncated,
        **row_field_arrays(questions),
    )
    t_end = time.perf_counter()
    seconds = {**sampled.seconds, "encode_and_convert": t_end - t_model}
    return BatchResult(arrays, int(lengths.sum()), int(plen.sum()) * S, seconds)


def _row_value(value: Any, integer: bool) -> Any:
    if integer:
        try:
            return int(float(value)) if value is not None and str(value).strip() != "" else -1
        except (TypeError, ValueError):
            return -1
    return "" if value is None else str(value)


def row_field_arrays(questions: Sequence[Question]) -> dict[str, np.ndarray]:
    """The dataset's row fields as the lake stores them (``ROW_FIELDS``: PopQA's ``prop`` as
    ``relation``, ``subj`` as ``subject``, ``s_pop``, ``o_pop``); missing values as the fill."""
    out = {}
    for name, column in ROW_FIELDS.items():
        integer = VARIABLES_BY_NAME[name].dtype == "int64"
        values = [_row_value(q.meta.get(column), integer) for q in questions]
        out[name] = np.array(values, dtype=np.int64 if integer else str)
    return out


def _layer_arrays(prompt_acts: dict[int, torch.Tensor], completion_acts: dict[int, torch.Tensor],
                  saes: dict[int, SAE], cfg: CaptureConfig, B: int, S: int) -> dict[str, np.ndarray]:
    """Per-layer residual variables and codes, stacked over layers (layer axis first)."""
    per: dict[str, list[np.ndarray]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        per.setdefault(name, []).append(value.cpu().numpy())

    for layer in cfg.layers:
        comp, prompt = completion_acts[layer], prompt_acts[layer]  # (R, d), (B, d)
        for prefix, rows, shape in (("resid", comp, (B, S)), ("resid_prompt", prompt, (B,))):
            stored, norm, over, nonfinite = to_lake_dtype(rows, cfg.resid_dtype)
            add(prefix, stored.reshape(*shape, -1))
            add(f"{prefix}_norm", norm.reshape(shape))
            add(f"{prefix}_overflow", over.clamp(max=65535).to(torch.int32).reshape(shape))
            add(f"{prefix}_nonfinite", nonfinite.clamp(max=65535).to(torch.int32).reshape(shape))
            if saes:
                sae = saes[layer]
                idx, vals = sae.encode_topk(stored.float(), k=cfg.sae_k or sae.k)
                # A row the model made non-finite has no meaningful code: store the explicit
                # "no code" row (indices 0..k-1, values 0); it stays flagged in *_nonfinite.
                bad = nonfinite > 0
                if bool(bad.any()):
                    idx[bad] = torch.arange(idx.shape[-1], device=idx.device)
                    vals[bad] = 0.0
                codes = "codes" if prefix == "resid" else "prompt_codes"
                add(f"{codes}_idx", idx.to(torch.int32).reshape(*shape, -1))
                add(f"{codes}_val", vals.float().reshape(*shape, -1))
    return {name: np.stack(vals) for name, vals in per.items()}


def _empty_shard(lake: QuestionLake, n: int) -> dict[str, np.ndarray]:
    out = {}
    for var in lake.variables:
        if var.name == "done":
            continue
        dtype = lake.arrays[var.name].dtype
        shape = lake.expected_shape(var, n)
        out[var.name] = np.empty(shape, dtype=object if dtype.kind in "TUO" else dtype)
    return out


@dataclass
class CaptureStats:
    shards: list[int]
    questions: int = 0
    samples: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_written: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    questions_per_batch: int = 0
    oom_backoffs: list[dict[str, int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return (self.new_tokens + self.prompt_tokens) / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_second"] = self.tokens_per_second
        return d


@dataclass
class CaptureResult(Report):
    """A capture run: the lake it wrote, how much of it is done, what this run did and how fast."""

    store: str
    done: int
    n_questions: int
    shards: list[int]
    stats: list[CaptureStats]
    layers: list[int] = field(default_factory=list)
    model: str = ""
    n_samples: int = 0

    @classmethod
    def of(cls, lake: QuestionLake, shards: list[int], stats: list[CaptureStats]) -> CaptureResult:
        return cls(lake.url, int(lake.done_mask().sum()), lake.n_questions, list(shards), list(stats), lake.layers,
                   str(lake.attrs.get("model", "")), int(lake.attrs["sampling"]["n_samples"]))

    @property
    def questions(self) -> int:
        """Questions captured by this run."""
        return sum(s.questions for s in self.stats)

    @property
    def tokens_per_second(self) -> float:
        wall = sum(s.wall_seconds for s in self.stats)
        return sum(s.new_tokens + s.prompt_tokens for s in self.stats) / wall if wall else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "done": self.done, "n_questions": self.n_questions, "shards": self.shards,
                "questions_captured": self.questions, "tokens_per_second": self.tokens_per_second,
                "layers": self.layers, "model": self.model, "stats": [s.as_dict() for s in self.stats]}

    def to_text(self) -> str:
        now = (f"{fmt(self.questions)} captured now at {fmt(self.tokens_per_second)} tokens/s" if self.questions
               else "nothing left to capture")
        return (f"{fmt(self.done)} of {fmt(self.n_questions)} questions done ({now}); layers {self.layers}, "
                f"{self.n_samples} samples each\nstore: {self.store}\n"
                f'open it: python -c "import xarray as xr; print(xr.open_zarr({self.store!r}))"')

    def to_markdown(self) -> str:
        mb = sum(s.bytes_written for s in self.stats) / 1e6
        return "\n".join([
            f"# Capture: `{self.store}`", "",
            "| questions done | captured now | samples | tokens/s | MB written | layers | model |",
            "|---|---|---|---|---|---|---|",
            f"| {self.done} / {self.n_questions} | {self.questions} | {self.questions * self.n_samples} | "
            f"{self.tokens_per_second:.0f} | {mb:.1f} | {self.layers} | {self.model} |", "",
            "Open it with:", "", f"```python\nimport xarray as xr\nds = xr.open_zarr({self.store!r})\n```"])


def capture_shards(plan: CapturePlan, shards: Sequence[int], progress: bool = False) -> CaptureStats:
    """Capture the given shards of the plan's store (each rewritten whole, then marked done)."""
    cfg, qs, budget = plan.config, plan.questions, plan.budget
    res = get_model(cfg)
    lm = res.lm
    saes = get_saes(cfg, lm)
    lake = QuestionLake.open(cfg.ref, mode="r+")  # this step's own handle (a task may run elsewhere)
    batch_size = resolve_questions_per_batch(cfg, lm, budget)
    stats = CaptureStats(list(shards))
    total = sum(lake.shard_region(s).stop - lake.shard_region(s).start for s in shards)
    # One capture at a time per model (hooks are per module), its writes flushed before the next
    # starts: a stop request then finds at most this step's shards in flight.
    with interrupt.working(), res.lock, background_writer(lake, cfg.writer_queue) as writer:
        with Progress(total, f"capture of shards {list(shards)}", "questions", bar=progress, logger=log) as bar:
            t0 = time.perf_counter()
            for shard in shards:
                interrupt.check(f"before shard {shard}")  # a shard is written whole, or not started
                region = lake.shard_region(shard)
                shard_qs = qs.questions[region]
                buf = _empty_shard(lake, len(shard_qs))
                # shortest prompts first: a batch pads to its longest prompt
                lengths = [min(len(_encode_prompt(lm, cfg, q)), budget) for q in shard_qs]
                order = np.argsort(lengths, kind="stable")
                start = 0
                while start < len(shard_qs):
                    interrupt.check(f"in shard {shard}, before it was written")  # nothing of it written yet
                    rows = order[start:start + batch_size]
                    batch = [shard_qs[i] for i in rows]
                    t = time.perf_counter()
                    try:
                        result = capture_batch(lm, saes, batch, cfg, budget)
                    except torch.OutOfMemoryError:
                        if batch_size == 1:
                            raise
                        smaller = max(1, len(batch) // 2)
                        log.warning("shard %d: out of device memory at %d questions per batch; retrying the batch at %d "
                                    "(nothing was written)", shard, len(batch), smaller)
                        stats.oom_backoffs.append({"shard": int(shard), "from": len(batch), "to": smaller})
                        batch_size = smaller
                        _free_device_memory(lm.device)
                        continue
                    stats.compute_seconds += time.perf_counter() - t
                    for name, value in result.arrays.items():
                        if name not in buf:  # an optional variable this (older) lake lacks
                            continue
                        qaxis = 1 if lake.arrays[name].metadata.dimension_names[0] == "layer" else 0
                        index = [slice(None)] * buf[name].ndim
                        index[qaxis] = rows
                        buf[name][tuple(index)] = value
                    for phase, sec in result.seconds.items():
                        stats.phase_seconds[phase] = stats.phase_seconds.get(phase, 0.0) + sec
                    stats.new_tokens += result.new_tokens
                    stats.prompt_tokens += result.prompt_tokens
                    bar.update(len(batch))
                    start += len(batch)
                writer.submit(shard, {k: (v.astype(str) if v.dtype == object else v) for k, v in buf.items()})
                stats.questions += len(shard_qs)
                stats.samples += len(shard_qs) * cfg.sampling.n_samples
                negative = int((buf["codes_val"] < 0).any(-1).sum()) if "codes_val" in buf else 0
                log.info(f"shard {shard}: {len(shard_qs)} questions captured (questions {region.start}..{region.stop - 1})"
                       + (f"; {negative} code rows with negative top-k values (kept, as Qwen-Scope's TopK does)"
                          if negative else ""))
    stats.write_seconds = writer.write_seconds
    stats.bytes_written = writer.bytes_written
    stats.wall_seconds = time.perf_counter() - t0
    stats.questions_per_batch = batch_size
    if stats.oom_backoffs:
        lake.update_attrs(capture_oom_backoffs=list(lake.attrs.get("capture_oom_backoffs", [])) + stats.oom_backoffs)
    return stats


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_questions_per_batch(cfg: CaptureConfig, lm: LoadedModel, budget: int) -> int:
    """``questions_per_batch``, or for ``auto`` what the free device memory holds (the memory
    model of ``qsae.lm.memory`` at the longest prompt the budget allows; 8 on a CPU)."""
    if cfg.questions_per_batch != "auto":
        return int(cfg.questions_per_batch)
    n = auto_questions_per_batch(lm.model.config, lm.dtype, lm.device, cfg.sampling.n_samples,
                                 budget + cfg.sampling.max_new_tokens, decode_experts(lm, cfg.decode), cfg.decode)
    if lm.device.type == "cuda":
        log.info("questions_per_batch auto: %d (free device memory, %d samples per question)", n, cfg.sampling.n_samples)
    return n


def decode_experts(lm: LoadedModel, path: str) -> str | None:
    """The MoE experts implementation decoding runs with (None for a dense model): the model's
    own in the one-pass loop; generate's switch to batched_mm on an accelerator in two_pass."""
    get = getattr(lm.model, "get_experts_implementation", None)
    impl = get() if get is not None else None
    if isinstance(impl, dict):
        impl = next(iter(impl.values()), None)
    if impl is None or not getattr(text_config(lm.model), "num_experts", None):
        return None
    if path == "two_pass" and lm.device.type != "cpu" and impl == "grouped_mm":
        return "batched_mm"
    return str(impl)


def finish_capture(plan: CapturePlan, shards: list[int], stats: list[CaptureStats], record: bool = True
                   ) -> CaptureResult:
    """After the steps: reread the lake (the steps marked shards done, maybe added attributes),
    record this run in its ``last_capture`` attribute (``record``: a fanned-out child leaves the
    store's attributes to its parent, so no writes race), and the run's result."""
    lake = QuestionLake.open(plan.config.ref, mode="r+")
    if record:
        lake.update_attrs(last_capture={"shards": list(shards), "questions": sum(s.questions for s in stats)})
    return CaptureResult.of(lake, shards, stats)


def run_capture(cfg: CaptureConfig, progress: bool = False) -> CaptureResult:
    """Plan and capture every pending shard in this process (the notebook entry point)."""
    plan = plan_capture(cfg)
    log.info("store %s: %d of %d shards to capture", plan.config.store, len(plan.pending), plan.lake.n_shards)
    stats = capture_shards(plan, plan.pending, progress=progress)
    return finish_capture(plan, plan.pending, [stats])

