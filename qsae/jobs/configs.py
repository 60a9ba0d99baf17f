"""Every job's configuration, in one torch-free module: what a run needs, each field described.

The CLI builds its options' help from these descriptions (one source of truth), and Prefect
shows them as the flows' parameter docs. The job modules re-export their config
(``from qsae.jobs.capture import CaptureConfig`` keeps working).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qsae.analysis.params import PaperParams
from qsae.errors import SAEFormatError
from qsae.sae.params import TrainerParams

if TYPE_CHECKING:
    from qsae.lake.storage import StoreRef
    from qsae.sae.model import SAE


class JobConfig(BaseModel):
    """The base of every job config: unknown fields refused; the fields of its nested parameter
    groups (``NESTED``: sampling, the paper's parameters, the trainer's) also accepted flat
    (``n_samples=20``, ``--set n_perm=99``, older deployments), by this one validator; flat
    values win over a nested group given too."""

    model_config = ConfigDict(extra="forbid")
    NESTED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _group(cls, name: str) -> type[BaseModel]:
        return cls.model_fields[name].annotation  # type: ignore[return-value]

    @classmethod
    def _route(cls, data: dict[str, Any], current: dict[str, Any] | None = None) -> dict[str, Any]:
        for name in cls.NESTED:
            group = cls._group(name)
            flat = {k: data[k] for k in group.model_fields if k in data and k not in cls.model_fields}
            if not flat:
                continue
            nested = data.get(name, (current or {}).get(name)) or {}
            if isinstance(nested, BaseModel):
                nested = nested.model_dump()
            data = {**{k: v for k, v in data.items() if k not in flat}, name: group(**{**nested, **flat})}
        return data

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        return cls._route(data) if isinstance(data, dict) and cls.NESTED else data

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        """As pydantic's, with nested groups' fields accepted flat too (``update={"n_samples": 4}``),
        which pydantic would otherwise set as a stray attribute and ignore."""
        if update and self.NESTED:
            update = self._route(dict(update), {n: getattr(self, n) for n in self.NESTED})
        return super().model_copy(update=update, deep=deep)

    @classmethod
    def field_info(cls, name: str) -> Any:
        """A field of this config or of one of its nested groups (the CLI's help comes from it)."""
        if name in cls.model_fields:
            return cls.model_fields[name]
        for group in cls.NESTED:
            fields = cls._group(group).model_fields
            if name in fields:
                return fields[name]
        raise KeyError(f"{cls.__name__} has no field {name!r}")


class StoreFields(BaseModel):
    """The store a job reads or writes, and ``ref``: it and its storage options as one handle."""

    store: str = Field("storage/lakes/demo.zarr", description="the lake (path or URL: a path, s3://bucket/x.zarr, ...)")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for a remote store (Secret "
                                                                     "blocks named by key_block/secret_block)")

    @property
    def ref(self) -> StoreRef:
        from qsae.lake.storage import StoreRef

        return StoreRef.of(self.store, self.storage_options)


class ModelFields(BaseModel):
    """The language model a job loads, and where it runs."""

    model: str = Field("smollm2", description="local folder, cached HF repo id, or 'smollm2'")
    model_revision: str | None = Field(None, description="model revision (branch, tag or commit) for a hub repo id; "
                                                         "recorded in the lake")
    trust_remote_code: bool = Field(False, description="allow a model's own modelling code from its folder/repo")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    dtype: str = Field("auto", description="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                           "bfloat16, float16")


class SamplingConfig(BaseModel):
    """How a capture samples its completions: recorded as the lake's ``sampling`` lineage."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(20, ge=1, description="sampled completions per question")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the entropies are of softmax(logits / temperature))")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this much probability")
    max_new_tokens: int = Field(16, ge=1, description="longest completion in tokens")
    stop_at_newline: bool = Field(True, description="end a completion at its first newline (PopQA answers are one line)")


class CaptureConfig(JobConfig, StoreFields, ModelFields):
    """One capture run. Fields that fix the lake's identity are checked on resume."""

    NESTED: ClassVar[tuple[str, ...]] = ("sampling",)

    sae: str | None = Field(None, description="SAE folder/file/repo id (per layer), or None for residuals only")
    sae_k: int | None = Field(None, description="k for the stored codes (default: the SAE's)")
    hook: Literal["resid_post", "mlp_out"] | None = Field(
        None, description="what `resid`/`resid_prompt` hold and the SAE encodes: the residual after each layer "
                          "(resid_post) or that layer's MLP output (mlp_out); default: the SAE's hook, "
                          "resid_post without an SAE")
    layers: list[int] = Field(default_factory=lambda: [15], description="decoder layers to capture (0-based)")
    dataset: str = Field("popqa-demo", description="'popqa-demo', a .jsonl/.json/.tsv/.txt file, or a cached HF dataset")
    dataset_split: str = Field("test", description="split of a cached HF dataset")
    limit: int | None = Field(None, description="use only the first N usable questions")
    on_bad_row: Literal["skip", "raise"] = Field("skip", description="skip (and record) or raise on a dataset row without a usable question/answers")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig,
                                     description="how completions are sampled (the lake's `sampling` lineage)")
    seed: int = Field(0, description="seed of the per-(question, sample) random streams: the same seed gives the same lake")
    prompt_template: str = Field("Q: {question}\nA:", description="the prompt, with {question} for the question text")
    max_prompt_tokens: int | None = Field(512, ge=1, description="prompts longer than this many tokens are cut from "
                                                              "the left or refused (on_long_prompt), with their "
                                                              "count and ids logged; None: the model's context - "
                                                              "sampling.max_new_tokens")
    on_long_prompt: Literal["truncate", "refuse"] = Field("truncate", description="truncate a prompt longer than the budget from the left, or refuse the dataset")
    resid_dtype: Literal["float16", "float32"] = Field("float16", description="on-disk dtype of the activations (float16 overflow is clipped and counted)")
    questions_per_shard: int = Field(64, ge=1, description="questions per shard: the unit of work, of resume and of one write")
    questions_per_chunk: int = Field(4, ge=1, description="questions per inner zarr chunk (the unit of a random read)")
    questions_per_batch: int | Literal["auto"] = Field(
        "auto", description="questions per batch (each with all its samples); auto: what the free GPU memory holds "
                            "(qsae.lm.memory), 8 on a CPU. A GPU out of memory halves it and retries the batch")
    decode: Literal["one_pass", "two_pass"] = Field(
        "one_pass", description="one_pass: each prompt prefilled once, activations captured while decoding; "
                                "two_pass: transformers' generate on every prompt x S, then a second forward "
                                "(the reference path, slower; the same draws)")
    mode: Literal["resume", "overwrite", "create"] = Field("resume", description="resume (default: skip done shards), overwrite, or create (refuse an existing store)")
    writer_queue: int = Field(2, ge=1, description="shards buffered for the background writer")

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"layers must be non-empty and unique, got {v}")
        return v

    def resolved_hook(self, saes: dict[int, SAE]) -> str:
        """The hook point captured: the configured one, else the SAE's (they must agree)."""
        sae_hooks = {sae.info.hook for sae in saes.values()}
        if len(sae_hooks) > 1:
            raise SAEFormatError(f"the layers' SAEs read different hook points {sorted(sae_hooks)}")
        sae_hook = next(iter(sae_hooks), None)
        if self.hook and sae_hook and self.hook != sae_hook:
            raise SAEFormatError(f"SAE {self.sae} reads {sae_hook}, but capture was asked for hook={self.hook}")
        return self.hook or sae_hook or "resid_post"


class CollectConfig(JobConfig, StoreFields, ModelFields):
    """One collection run; the fields that fix the store are checked on resume."""

    dataset: str = Field("wiki-demo", description="'wiki-demo', a .txt/.jsonl file or a cached HF dataset")
    text_field: str = Field("text", description="the text column of a .jsonl file or HF dataset")
    dataset_split: str = Field("train", description="split of a cached HF dataset")
    hook: Literal["resid_post", "mlp_out"] = Field("resid_post", description="resid_post (the residual after each layer) or mlp_out (that layer's MLP output)")
    layers: list[int] = Field(default_factory=lambda: [15], description="decoder layers to store (0-based)")
    context_length: int = Field(128, ge=2, description="tokens per context window (BOS included when prepended)")
    windows_per_batch: int = Field(16, ge=1, description="context windows (rows) per forward pass and per block")
    bos: Literal["prepend", "none"] = Field("prepend", description="prepend BOS to each window, or none (then a window's first token is flagged special)")
    max_tokens: int | None = Field(None, description="stop after about this many stored tokens")
    resid_dtype: Literal["float16", "float32"] = Field("float16", description="on-disk dtype of the activations")
    store: str = Field("storage/lakes/tokens.zarr", description="token lake URL")
    mode: Literal["resume", "overwrite", "create"] = Field("resume", description="resume (default), overwrite, or create")


class TrainConfig(JobConfig, StoreFields):
    """One SAE training run over one layer of a token lake; the optimisation's own parameters
    are the trainer's (``trainer``, also given flat: ``--set k=64``)."""

    NESTED: ClassVar[tuple[str, ...]] = ("trainer",)

    store: str = Field("storage/lakes/tokens.zarr", description="the token lake to train on")
    layer: int | None = Field(None, description="default: the store's only layer")
    trainer: TrainerParams = Field(default_factory=TrainerParams, description="architecture, sparsity, optimiser")
    expansion: int = Field(4, ge=1, description="d_sae = expansion * d_model unless d_sae is given")
    d_sae: int | None = Field(None, description="default: expansion * d_model")
    batch_size: int = Field(4096, ge=1, description="the 9B release's value")
    epochs: float = Field(1.0, gt=0, description="passes over the lake's training tokens")
    total_tokens: int | None = Field(None, description="overrides epochs")
    buffer_blocks: int = Field(8, ge=1, description="lake blocks shuffled together (bounded memory)")
    include_special: bool = Field(False, description="train on BOS/EOS/window-start tokens too")
    checkpoint_every: int = Field(200, ge=1, description="steps")
    log_every: int = Field(25, ge=1, description="steps")
    out: str = Field("storage/saes/demo", description="folder for the SAELens export and the checkpoints")
    resume: bool = Field(True, description="continue from out/checkpoints/latest.pt when it exists")
    device: str = Field("cpu", description="torch device")
    init_from: str | None = Field(None, description="start from this SAE (e.g. the base model's, to follow its "
                                                    "features through a fine-tune); its width is used")


class ReconstructionConfig(JobConfig, StoreFields):
    """What to evaluate: a question lake's stored codes per position, or a token lake of text."""

    store: str = Field("storage/lakes/demo.zarr", description="a question lake or a token lake (path or URL)")
    layers: list[int] | None = Field(None, description="layers to evaluate; default: every captured layer")
    sae: str | None = Field(None, description="question lake: the SAE source if it moved since capture (hash still "
                                              "checked); token lake: the SAE to evaluate (required)")
    sae_k: int | None = Field(None, ge=1, description="token lake: k of a TopK SAE whose files do not record it "
                                                      "(Qwen-Scope)")
    positions: Literal["completion", "prompt", "both"] = Field(
        "both", description="question lake: which stored positions to evaluate, each reported separately")
    block_questions: int = Field(256, ge=1, description="question lake: questions read per block")
    block_tokens: int = Field(4096, ge=1, description="token lake: tokens read per block")
    include_special: bool = Field(False, description="token lake: also evaluate BOS/EOS/pad positions "
                                                     "(SAEBench leaves them out)")
    model_in_loop: bool = Field(False, description="also CE loss recovered and KL with the model")
    model: str | None = Field(None, description="default: the lake's model_path")
    text_dataset: str = Field("wiki-demo", description="documents for the model-in-the-loop metrics")
    context_length: int = Field(128, ge=2, description="model in the loop: tokens per window")
    max_tokens: int = Field(8192, ge=1, description="tokens scored with the model in the loop")
    batch_windows: int = Field(8, ge=1, description="model in the loop: windows per forward pass")
    device: str = Field("cpu", description="torch device for encoding/decoding and the model")
    dtype: str = Field("float32", description="the model's dtype in the loop")


class FeaturesConfig(JobConfig, StoreFields):
    """Feature dashboards (and a Neuronpedia export) of a question lake's SAE codes."""

    layers: list[int] | None = Field(None, description="layers to build (default: every layer of the lake)")
    top_n: int = Field(10, ge=1, description="top questions and top completions shown per feature")
    logit_effects: bool = Field(True, description="decoder logit effects through the unembedding, read from the "
                                                  "model's safetensors when the model is local (else skipped, with the reason)")
    neuronpedia: str | None = Field(None, description="also write Neuronpedia's per-feature JSON batches under this folder")
    sae: str | None = Field(None, description="for a token lake (qsae collect): the SAE that encodes its activations")
    sae_k: int | None = Field(None, description="k for that SAE's codes (default: the SAE's)")


class RivalryConfig(JobConfig, StoreFields):
    """The rivalry study's parameters; the defaults are the paper's protocol. The per-group
    statistics' and the calibrated test's knobs are ``paper`` (also given flat: ``--set
    min_mean=0.05``)."""

    NESTED: ClassVar[tuple[str, ...]] = ("paper",)

    layers: list[int] | None = Field(None, description="layers to test; default: every captured layer")
    protocol: Literal["paper", "per_question"] = Field(
        "paper", description="paper: correlations across a group's questions at the prompt's end; "
                             "per_question: one score per question over its distinct completions")
    entropy: Literal["first_word", "exact", "sampled"] = Field(
        "first_word", description="first_word: the paper's normalised first-word entropy of the samples; "
                                  "exact: logit entropy (nats); sampled: first-token empirical entropy (nats)")
    rule: Literal["thresholds", "median", "quantile", "threshold"] = Field(
        "thresholds", description="thresholds: ambiguous > high, unambiguous < low (the paper)")
    high: float = Field(0.7, description="thresholds rule: ambiguous above this entropy")
    low: float = Field(0.5, description="thresholds rule: unambiguous below this entropy")
    q: float = Field(0.25, gt=0, le=0.5, description="quantile rule: top/bottom fraction")
    threshold: float | None = Field(None, description="threshold rule: ambiguous above this entropy")
    paper: PaperParams = Field(default_factory=PaperParams, description="the per-group statistics (the paper's "
                                                                       "filter and p5) and the calibrated test")
    n_perm: int = Field(1000, ge=0, description="draws of each reference of the calibrated test (its own null, "
                                                "relabellings): no p-value below 1/(n_perm + 1)")
    strata: str = Field("auto", description="question variable the calibrated test stratifies by (labels permuted "
                                            "within strata): auto = `relation` when the lake has several, none, "
                                            "or a variable name")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for CIs")
    seed: int = Field(0, description="seed of permutations, nulls and bootstraps")
    block_questions: int = Field(256, ge=1, description="per_question: questions read per block")
    correctness: bool = Field(True, description="AUROC of the per-prompt score for `correct` (reads the SAE's "
                                                "decoder from the lake's sae_source)")
    n_jobs: int | None = Field(None, ge=1, description="threads for the permutations (default: up to 4 cores)")


class SteerConfig(JobConfig, StoreFields):
    """The rivalry paper's steering experiment (its exp2) on a question lake with a rivalry result:
    steer the layer's residual along rival pairs' decoder differences, count the flips."""

    layer: int | None = Field(None, description="the layer to steer; default: the rivalry result's peak layer "
                                               "(largest p5_unambiguous - p5_ambiguous)")
    preset: Literal["calibrated", "paper"] = Field(
        "calibrated", description="calibrated: rival pairs against frequency-matched control pairs and random "
                                  "directions, with p-values; paper: the paper's choices exactly (one random "
                                  "direction per pair, absolute multipliers, its output fields)")
    top_pairs: int = Field(50, ge=1, description="the most negative correlations of the ambiguous group taken "
                                                 "as rival pairs (the paper: 50)")
    pairs: int = Field(20, ge=1, description="rival pairs tested, the most negative first (the paper: 20)")
    prompts: int | None = Field(50, ge=1, description="the first N ambiguous prompts in lake order (the paper: "
                                                      "50); None: every ambiguous prompt")
    multipliers: list[float] = Field(default_factory=lambda: [5.0, 10.0, 20.0],
                                     description="steering strengths (the paper: 5, 10, 20)")
    units: Literal["absolute", "norm"] = Field(
        "absolute", description="absolute: m * unit direction (the paper); norm: m times the layer's median "
                                "prompt-end residual norm (comparable across models and layers)")
    max_new_tokens: int = Field(10, ge=1, description="greedy tokens per completion (the paper: 10)")
    controls: int = Field(20, ge=0, description="calibrated: control pairs (no rivals, matched in firing "
                                                "frequency) per multiplier")
    randoms: int = Field(20, ge=0, description="calibrated: isotropic random directions per multiplier")
    n_perm: int = Field(9999, ge=1, description="relabellings of the across-pairs test")
    seed: int = Field(0, description="seed of the control pairs, the random directions and the relabellings")
    rivals: Literal["top", "random"] = Field(
        "top", description="top: the most anti-correlated pairs (the experiment); random: random feature pairs "
                           "of the group (a null: the level check)")
    model: str | None = Field(None, description="the model (default: the lake's model_path)")
    sae: str | None = Field(None, description="the SAE source if it moved since capture (its sha256 is checked)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    dtype: str = Field("auto", description="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    rows_per_batch: int = Field(256, ge=1, description="conditions decoded together per prompt")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step (a mapped task; the unit of resume)")
    early_exit: bool = Field(True, description="a steered row leaves once its text already differs from the "
                                               "baseline's (the paper's verdict, decided early)")

    @field_validator("multipliers")
    @classmethod
    def _multipliers(cls, v: list[float]) -> list[float]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"multipliers must be non-empty and distinct, got {v}")
        return [float(x) for x in v]


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_sae: str = Field(..., description="SAE of the base model (file, folder or cached repo id)")
    finetuned_sae: str = Field(..., description="SAE of the fine-tuned model (may be the same SAE)")
    layer: int | None = Field(None, description="layer, for per-layer SAE folders and the lakes")
    threshold: float = Field(0.7, gt=0, le=1, description="no counterpart above this cosine: emerged/vanished")
    candidates: int = Field(8, ge=1, description="partners kept per feature for the assignment")
    block: int = Field(2048, ge=1, description="decoder rows per block of the similarity computation (bounded memory)")
    base_lake: str | None = Field(None, description="question lake captured with the base model and base SAE")
    finetuned_lake: str | None = Field(None, description="question lake of the fine-tuned model and its SAE")
    inputs: Literal["prompt_end", "completion_end"] = Field(
        "prompt_end", description="firing shifts from prompt-end codes (the same prompts through both models: "
                                  "a fair comparison) or completion-end codes (each model's own sampled "
                                  "completions: different inputs, labelled so)")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for remote lakes")
    out: str | None = Field(None, description="store for the results group (default: the fine-tuned lake)")
    top_n: int = Field(10, ge=1, description="largest shifts and emerged examples listed in the summary")
    name: str = Field("compare", description="result group prefix: <name>/layer_<L>")

    def lake_ref(self, url: str) -> StoreRef:
        """One of the compared lakes (or ``out``) with this config's storage options."""
        from qsae.lake.storage import StoreRef

        return StoreRef.of(url, self.storage_options)
