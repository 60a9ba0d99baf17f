"""The pipeline's own stages and result: a capture (in-process or fanned out to GPU workers)
checked complete and recorded in the lake, then the analyses' results side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qsae.errors import QsaeError
from qsae.jobs.report import Report
from qsae.lake.storage import StoreRef
from qsae.lake.store import QuestionLake

if TYPE_CHECKING:  # the results' types only: importing reconstruction would load torch here
    from qsae.jobs.reconstruction import ReconstructionResult
    from qsae.jobs.rivalry import RivalryResult


class IncompleteCaptureError(QsaeError):
    """The pipeline's capture left questions not done: the analyses would run on part of the lake."""

    transient = True


def record_capture(ref: StoreRef, captures: list[dict[str, Any]]) -> QuestionLake:
    """Check every question is done after the capture stage and record its runs in the lake."""
    lake = QuestionLake.open(ref, mode="r+")
    missing = int((~lake.done_mask()).sum())
    if missing:
        raise IncompleteCaptureError(f"{ref.url}: {missing} questions not done after capture; rerun the pipeline to "
                                     "resume (done shards are skipped)")
    lake.update_attrs(last_pipeline={"captures": captures})
    return lake


@dataclass
class PipelineResult(Report):
    """The lake, the capture runs (one per GPU queue when fanned out), and each analysis' result."""

    store: str
    n_questions: int
    layers: list[int]
    rivalry: RivalryResult
    reconstruction: ReconstructionResult
    captures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "n_questions": self.n_questions, "layers": self.layers, "captures": self.captures,
                "rivalry": self.rivalry.to_dict(), "reconstruction": self.reconstruction.to_dict()}

    def to_text(self) -> str:
        return "\n\n".join([f"pipeline: {self.store} ({self.n_questions} questions, layers {self.layers})",
                            self.rivalry.to_text(), self.reconstruction.to_text()])

    def to_markdown(self) -> str:
        riv, rec = self.rivalry, self.reconstruction
        lines = [f"# qsae pipeline: `{self.store}`", "",
                 f"- lake: `{self.store}` ({self.n_questions} questions, layers {self.layers}); open with "
                 f"`xr.open_zarr({self.store!r})`",
                 f"- rivalry ({riv.protocol} protocol): group `{riv.group}`, figure `{riv.figure}`, one-sided p by "
                 "layer " + ", ".join(f"{layer}: {r.test.p_less}" for layer, r in riv.layers.items()),
                 f"- reconstruction: group `reconstruction`, figure `{rec.figure}`"]
        if self.captures:
            lines += ["", "| capture flow run | worker | queue | shards |", "|---|---|---|---|"]
            lines += [f"| {c['flow_run']} | {c['worker']} | {c['queue']} | {c['shards']} |" for c in self.captures]
        return "\n".join(lines)
