"""Question loaders: real PopQA rows, every file format, malformed rows reported by number."""

from __future__ import annotations

import json

import pytest

from qsae.errors import DatasetError
from qsae.lm.datasets import format_prompt, is_correct, load_questions

from ..helpers import SHARED


def test_embedded_demo_rows_are_real_popqa():
    qs = load_questions("popqa-demo")
    assert len(qs) == 256 and not qs.problems
    union = {json.loads(line)["id"]: json.loads(line) for line in (SHARED / "data/popqa/popqa_union.jsonl").open()}
    for q in qs.questions[:50]:
        assert union[q.id]["question"] == q.question
        assert list(q.answers) == json.loads(union[q.id]["possible_answers"])
    assert qs.revision.startswith("sha256-")


def test_shared_popqa_files_load(tmp_path):
    hip = load_questions(str(SHARED / "data/popqa/hipporag_popqa_1000.json"))
    assert len(hip) == 1000 and hip.questions[0].id == 4222362
    assert hip.questions[0].meta["prop"] == "occupation" and "politician" in hip.questions[0].answers
    mc = load_questions(str(SHARED / "data/popqa/model_collaboration_popqa_2000.json"))
    assert len(mc) == 2000  # dev + test; `input`/`output` columns


def test_original_tsv_columns(tmp_path):
    rows = [
        "id\tsubj\tprop\tobj\ts_pop\tquestion\tpossible_answers",
        '4222362\tGeorge Rankin\toccupation\tpolitician\t142\tWhat is George Rankin\'s occupation?\t["politician", "pol"]',
        '7\tX\toccupation\ty\t1\tWhat is X\'s job?\tnot json',
        "8\tY\toccupation\ty\t1\t\t[\"a\"]",
        '9\tZ\toccupation\ty\t1\tWho?\t["b"]\textra',
    ]
    path = tmp_path / "popQA.tsv"
    path.write_text("\n".join(rows) + "\n")
    qs = load_questions(str(path))
    assert [q.id for q in qs.questions] == [4222362]
    assert [(p.row, p.id) for p in qs.problems] == [(2, 7), (3, 8), (4, None)]
    assert "unparsable answers" in qs.problems[0].reason
    assert "missing or empty question" in qs.problems[1].reason
    assert "fields" in qs.problems[2].reason
    with pytest.raises(DatasetError, match=r"3 malformed rows:\n  row 2 \(id 7\): unparsable answers"):
        load_questions(str(path), on_error="raise")


def test_jsonl_bad_rows_and_non_utf8(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        json.dumps({"id": 1, "question": "Who wrote Hamlet?", "possible_answers": '["Shakespeare"]'}).encode(),
        b'{"id": 2, "question": "Caf\xe9?", "possible_answers": "[\\"x\\"]"}',  # latin-1, not UTF-8
        b"{not json",
        json.dumps({"id": 3, "possible_answers": '["y"]'}).encode(),
        json.dumps({"id": 1, "question": "dup", "possible_answers": '["z"]'}).encode(),
        json.dumps({"id": 4, "question": "What?", "possible_answers": "[]"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines))
    qs = load_questions(str(path))
    assert qs.ids() == [1]
    reasons = {p.row: p.reason for p in qs.problems}
    assert "not valid UTF-8" in reasons[2] and "invalid JSON" in reasons[3]
    assert "missing or empty question" in reasons[4] and reasons[5] == "duplicate id"
    assert "empty" in reasons[6]


def test_plain_prompts_and_empty_dataset(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("The capital of France is\n\nThe author of Hamlet is\n")
    qs = load_questions(str(txt))
    assert [(q.id, q.question, q.answers) for q in qs.questions] == [
        (1, "The capital of France is", ()), (3, "The author of Hamlet is", ())]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="no usable questions"):
        load_questions(str(empty))
    with pytest.raises(DatasetError, match="neither a local file nor a dataset"):
        load_questions("nobody/no-such-dataset")


def test_prompt_template_and_answer_match():
    q = load_questions("popqa-demo").questions[0]
    assert format_prompt("Q: {question}\nA:", q) == f"Q: {q.question}\nA:"
    with pytest.raises(DatasetError, match="needs field 'nope'"):
        format_prompt("{nope}", q)
    assert is_correct("He was a POLITICIAN.", ["politician"]) and not is_correct("a baker", ["politician"])
