"""Question datasets for capture: PopQA (TSV/JSONL/JSON or a cached HF dataset) and prompt lists.

Every malformed row is reported with its row number and reason, then skipped or refused per
``on_error``; nothing is dropped silently. Row numbers count from 1 (the header of a TSV is
row 0, so they match a text editor's line numbers minus one there).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from qsae.errors import DatasetError

log = logging.getLogger("qsae.lm.datasets")
OnError = Literal["skip", "raise"]
EMBEDDED_DATASETS = {"popqa-demo": "popqa_demo.jsonl"}
EMBEDDED_TEXTS = {"wiki-demo": "wiki_paragraphs.jsonl"}
TEXT_KEYS = ("question", "prompt", "text", "input")
ANSWER_KEYS = ("possible_answers", "answers", "output")


@dataclass(frozen=True)
class Question:
    """One question: its dataset id, text and gold answers (may be empty for plain prompts)."""

    id: int
    question: str
    answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    dataset_id: str | None = None  # the dataset's own id when it is not an integer (``id`` derives from it)


@dataclass(frozen=True)
class RowProblem:
    row: int
    id: Any
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.id}): {self.reason}"


@dataclass
class QuestionSet:
    """Loaded questions plus the rows that were refused and why (recorded in the lake)."""

    questions: list[Question]
    name: str
    revision: str
    problems: list[RowProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    def ids(self) -> list[int]:
        return [q.id for q in self.questions]

    def dataset_ids(self) -> list[str] | None:
        """The dataset's own (string) ids, or None when its ids are integers and ``ids()`` are them."""
        if all(q.dataset_id is None for q in self.questions):
            return None
        return [q.dataset_id if q.dataset_id is not None else str(q.id) for q in self.questions]


def derive_question_id(dataset_id: str) -> int:
    """The integer ``question`` coordinate of a non-integer dataset id: its sha256's first 63 bits.

    Stable whatever the file's order or subset (a question keeps its coordinate, hence its
    seeded samples); two ids mapping to one integer are refused (about 1 in 10^10 for 10^4 ids).
    """
    return int.from_bytes(hashlib.sha256(dataset_id.encode("utf-8")).digest()[:8], "big") >> 1


def _integer_id(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    return None


def _parse_answers(value: Any) -> tuple[str, ...]:
    if value is None:
        raise ValueError("no answers")
    if isinstance(value, str):
        parsed = json.loads(value)
    else:
        parsed = value
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(a, str) for a in parsed):
        raise ValueError(f"answers must be a list of strings, got {type(parsed).__name__}")
    answers = tuple(a for a in parsed if a.strip())
    if not answers:
        raise ValueError("answers list is empty")
    return answers


def _rows_from_records(records: Iterable[tuple[int, Any]], require_answers: bool) -> tuple[list[Question], list[RowProblem]]:
    """Questions from raw rows. Ids may be integers or strings: if every id is an integer they
    are the ``question`` coordinate as they are; otherwise each row keeps its id as
    ``dataset_id`` and the coordinate is ``derive_question_id`` of it."""
    records = list(records)
    _require_columns([rec for _, rec in records if isinstance(rec, dict)], require_answers)
    raw_ids = [rec.get("id", row) for row, rec in records if isinstance(rec, dict)]
    odd = [r for r in raw_ids if _integer_id(r) is None]
    as_strings = bool(odd)
    if odd and len(odd) < len(raw_ids):  # one stray id switches every question to derived numbers: say so
        log.warning("%d of %d ids are not integers (%s%s): every question's number is derived from its id as a "
                    "string (kept in `dataset_id`); fix those ids to keep the integer ids as they are",
                    len(odd), len(raw_ids), ", ".join(repr(r) for r in odd[:5]), " ..." if len(odd) > 5 else "")
    questions, problems, seen, derived = [], [], set(), {}
    for row, rec in records:
        if isinstance(rec, RowProblem):
            problems.append(rec)
            continue
        if not isinstance(rec, dict):
            problems.append(RowProblem(row, None, f"not an object but {type(rec).__name__}"))
            continue
        raw_id = rec.get("id", row)
        dataset_id: str | None = None
        if as_strings:
            if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()) or isinstance(raw_id, (dict, list)):
                problems.append(RowProblem(row, raw_id, "empty or missing id"))
                continue
            dataset_id = str(raw_id).strip()
            qid = derive_question_id(dataset_id)
            if derived.setdefault(qid, dataset_id) != dataset_id:
                raise DatasetError(f"ids {derived[qid]!r} and {dataset_id!r} derive the same question number {qid}")
        else:
            qid = int(_integer_id(raw_id))  # type: ignore[arg-type]
        text = next((rec[k] for k in TEXT_KEYS if k in rec), None)
        if not isinstance(text, str) or not text.strip():
            problems.append(RowProblem(row, dataset_id if dataset_id is not None else qid, "missing or empty question"))
            continue
        answers: tuple[str, ...] = ()
        ans_key = next((k for k in ANSWER_KEYS if k in rec), None)
        if ans_key is not None or require_answers:
            try:
                answers = _parse_answers(rec.get(ans_key) if ans_key else None)
            except (ValueError, json.JSONDecodeError) as exc:
                problems.append(RowProblem(row, dataset_id if dataset_id is not None else qid,
                                           f"unparsable answers: {exc}"))
                continue
        if qid in seen:
            problems.append(RowProblem(row, dataset_id if dataset_id is not None else qid, "duplicate id"))
            continue
        seen.add(qid)
        meta = {k: v for k, v in rec.items() if k not in (*TEXT_KEYS, *ANSWER_KEYS, "id")}
        questions.append(Question(qid, text.strip(), answers, meta, dataset_id))
    return questions, problems


def _require_columns(rows: list[dict[str, Any]], require_answers: bool) -> None:
    """Refuse a dataset none of whose rows has a question (or, when required, an answers)
    column, naming the columns it has and the nearest expected name: a misspelled header
    is one mistake, not one problem per row."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for rec in rows[:1000] for k in rec))
    wanted = [("question", TEXT_KEYS)] + ([("answers", ANSWER_KEYS)] if require_answers else [])
    for what, keys in wanted:
        if not any(k in columns for k in keys):
            import difflib

            score, was, near = max(((difflib.SequenceMatcher(None, str(c).lower(), k).ratio(), c, k)
                                    for c in columns for k in keys), key=lambda t: t[0])
            hint = f" (is {was!r} meant to be {near!r}?)" if score >= 0.75 else ""
            raise DatasetError(f"no {what} column: expected one of {', '.join(keys)}; the rows have "
                               f"{', '.join(map(str, columns))}{hint}")


def _decode_lines(data: bytes) -> Iterable[tuple[int, str | RowProblem]]:
    for i, raw in enumerate(data.splitlines(), start=1):
        try:
            yield i, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield i, RowProblem(i, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")


def _jsonl_records(data: bytes):
    for i, line in _decode_lines(data):
        if isinstance(line, RowProblem):
            yield i, line
        elif line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, RowProblem(i, None, f"invalid JSON: {exc.msg}")


def _tsv_records(data: bytes):
    lines = list(_decode_lines(data))
    if not lines or isinstance(lines[0][1], RowProblem):
        raise DatasetError("TSV file has no readable header row")
    header = next(csv.reader([lines[0][1]], delimiter="\t"))
    for i, line in lines[1:]:
        if isinstance(line, RowProblem):
            yield i - 1, RowProblem(i - 1, None, line.reason)
            continue
        if not line.strip():
            continue
        values = next(csv.reader(io.StringIO(line), delimiter="\t"))
        if len(values) != len(header):
            yield i - 1, RowProblem(i - 1, None, f"has {len(values)} fields, the header has {len(header)}")
            continue
        yield i - 1, dict(zip(header, values))


def _json_records(data: bytes):
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"JSON file is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(obj, dict):  # {"dev": [...], "test": [...]} style
        obj = [r for key in ("dev", "test", "train", "data", "rows") if isinstance(obj.get(key), list) for r in obj[key]]
    if not isinstance(obj, list):
        raise DatasetError("JSON file must hold a list of rows (or a dict of such lists)")
    return enumerate(obj, start=1)


def describe_problems(problems: list[RowProblem], shown: int = 5) -> str:
    """The first few refused rows with their reasons, and how many more: one line each."""
    lines = [f"  {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def _finish(questions, problems, name, revision, on_error: OnError, limit: int | None) -> QuestionSet:
    if problems and on_error == "raise":
        raise DatasetError(f"{name}: {len(problems)} malformed rows:\n{describe_problems(problems, 10)}")
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise DatasetError(f"{name}: no usable questions ({len(problems)} malformed rows):\n{describe_problems(problems)}")
    return QuestionSet(questions, name, revision, problems)


def load_questions(
    source: str, *, on_error: OnError = "skip", limit: int | None = None, require_answers: bool | None = None,
    split: str = "test",
) -> QuestionSet:
    """Load questions from an embedded name, a local file, or a cached Hugging Face dataset.

    Files: ``.jsonl``, ``.json``, ``.tsv`` (PopQA columns: ``id``, ``question``,
    ``possible_answers`` as a JSON list string, ...) and ``.txt`` (one prompt per line, ids
    are line numbers). ``require_answers`` defaults to True except for ``.txt``.
    """
    if source in EMBEDDED_DATASETS:
        data = resources.files("qsae.data").joinpath(EMBEDDED_DATASETS[source]).read_bytes()
        recs = _jsonl_records(data)
        name = f"qsae:{source}"
        required = True if require_answers is None else require_answers
    else:
        path = Path(source).expanduser()
        if not path.exists():
            return _load_hf_dataset(source, split, on_error, limit, require_answers)
        data = path.read_bytes()
        name = str(path)
        suffix = path.suffix.lower()
        required = (suffix != ".txt") if require_answers is None else require_answers
        if suffix == ".jsonl":
            recs = _jsonl_records(data)
        elif suffix == ".json":
            recs = _json_records(data)
        elif suffix in (".tsv", ".csv"):
            recs = _tsv_records(data)
        elif suffix == ".txt":
            recs = ((i, line if isinstance(line, RowProblem) else {"id": i, "prompt": line})
                    for i, line in _decode_lines(data) if isinstance(line, RowProblem) or line.strip())
        else:
            raise DatasetError(f"{path}: unknown dataset format {suffix!r} (use .jsonl, .json, .tsv or .txt)")
    try:
        questions, problems = _rows_from_records(recs, required)
    except DatasetError as exc:
        raise DatasetError(f"{name}: {exc}") from None
    revision = "sha256-" + hashlib.sha256(data).hexdigest()
    return _finish(questions, problems, name, revision, on_error, limit)


def _load_hf_dataset(name: str, split: str, on_error: OnError, limit: int | None, require_answers: bool | None) -> QuestionSet:
    """A Hugging Face dataset (e.g. ``akariasai/PopQA``) from the local cache only."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, download_mode="reuse_cache_if_exists")
    except Exception as exc:  # datasets raises many types; the message is what matters
        raise DatasetError(
            f"{name} is neither a local file nor a dataset in the local Hugging Face cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    questions, problems = _rows_from_records(enumerate(ds, start=1), True if require_answers is None else require_answers)
    return _finish(questions, problems, f"hf:{name}:{split}", f"fingerprint-{ds._fingerprint}", on_error, limit)


def is_correct(completion: str, answers: Iterable[str]) -> bool:
    """PopQA's rule: a gold answer appears in the completion, case-insensitively."""
    text = completion.lower()
    return any(a.lower() in text for a in answers if a)


def format_prompt(template: str, question: Question) -> str:
    """Fill the prompt template (``{question}`` and any of the row's fields)."""
    try:
        return template.format(question=question.question, **{k: v for k, v in question.meta.items() if k != "question"})
    except KeyError as exc:
        raise DatasetError(f"prompt template needs field {exc} which row id {question.id} does not have") from None


@dataclass
class TextCorpus:
    """Documents to stream through a model for token-level activations."""

    texts: list[str]
    name: str
    revision: str
    problems: list[RowProblem] = field(default_factory=list)


def load_texts(source: str, *, text_field: str = "text", split: str = "train", limit: int | None = None) -> TextCorpus:
    """Documents from an embedded corpus, a ``.txt`` (one per line) / ``.jsonl`` file, or a
    cached Hugging Face dataset's ``text_field`` column. Unreadable rows are reported."""
    problems: list[RowProblem] = []
    if source in EMBEDDED_TEXTS:
        data = resources.files("qsae.data").joinpath(EMBEDDED_TEXTS[source]).read_bytes()
        name, suffix = f"qsae:{source}", ".jsonl"
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        data, name, suffix = path.read_bytes(), str(path), path.suffix.lower()
    else:
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split, download_mode="reuse_cache_if_exists")
        except Exception as exc:
            raise DatasetError(f"{source} is neither a local file nor a cached Hugging Face dataset ({type(exc).__name__})") from None
        if text_field not in ds.column_names:
            raise DatasetError(f"{source} has no column {text_field!r}; columns: {ds.column_names}")
        texts = [t for t in ds[text_field][: limit or None] if isinstance(t, str) and t.strip()]
        if not texts:
            raise DatasetError(f"{source}: no non-empty {text_field!r} values")
        return TextCorpus(texts, f"hf:{source}:{split}", f"fingerprint-{ds._fingerprint}")
    texts: list[str] = []
    if suffix == ".jsonl":
        for row, rec in _jsonl_records(data):
            if isinstance(rec, RowProblem):
                problems.append(rec)
            elif not isinstance(rec, dict) or not isinstance(rec.get(text_field), str) or not rec[text_field].strip():
                problems.append(RowProblem(row, None, f"no non-empty {text_field!r} field"))
            else:
                texts.append(rec[text_field])
    elif suffix == ".txt":
        for _row, line in _decode_lines(data):
            if isinstance(line, RowProblem):
                problems.append(line)
            elif line.strip():
                texts.append(line)
    else:
        raise DatasetError(f"{name}: unknown text format {suffix!r} (use .txt or .jsonl)")
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise DatasetError(f"{name}: no documents ({len(problems)} unreadable rows)")
    return TextCorpus(texts, name, "sha256-" + hashlib.sha256(data).hexdigest(), problems)
