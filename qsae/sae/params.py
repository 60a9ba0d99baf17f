"""The SAE trainer's own parameters (torch-free, described): what the optimisation needs, never
the job's store, output folder or device. ``TrainConfig.trainer`` nests them (their fields also
given flat, ``--set k=64``); a checkpoint records them and a resume compares them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_LR = {"topk": 5e-4, "relu": 5e-5}


class TrainerParams(BaseModel):
    """Architecture, sparsity, optimiser and dead-latent settings of one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["topk", "relu"] = Field("topk", description="topk (Qwen-Scope style) or relu (ReLU + L1, "
                                                                      "the 9B release)")
    k: int = Field(32, ge=1, description="TopK: active latents per token")
    l1_coefficient: float = Field(0.005, ge=0, description="ReLU only (the 9B release's value)")
    l1_units: Literal["scaled", "raw"] = Field(
        "scaled", description="ReLU: the L1 trade-off on the rescaled inputs (scale-free), or in raw activation "
                              "units as the 9B release (λ / scale^2 on the scaled inputs)")
    lr: float | None = Field(None, gt=0, description="default: 5e-4 TopK, 5e-5 ReLU (the 9B release)")
    dead_tokens: int = Field(250_000, ge=1, description="a latent is dead after this many tokens without firing "
                                                        "(Gao et al.: 10M; smaller for CPU-sized runs)")
    aux_k: int = Field(256, ge=1, description="AuxK: dead latents used to model the error (Gao et al.: 512)")
    aux_coefficient: float = Field(1 / 32, ge=0, description="AuxK weight (Gao et al.: 1/32)")
    seed: int = Field(0, description="seed of the initialisation and the data order (resume replays it exactly)")

    @property
    def resolved_lr(self) -> float:
        """``lr``, else the architecture's default (5e-4 TopK, 5e-5 ReLU)."""
        return self.lr or DEFAULT_LR[self.architecture]
