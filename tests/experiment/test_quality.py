"""Quality scorers: diversity, reference scorers and the HumanEval sandbox."""

from __future__ import annotations

import time

import pytest

from decodelab.experiment.quality import aggregate_quality, distinct_n, extract_code, math_exact, repetition_rate, score
from decodelab.tasks.base import Prompt
from decodelab.tasks.humaneval import load_humaneval, read_problems


def prompt(scorer=None, reference=None, **meta) -> Prompt:
    return Prompt(id="t", category="c", turns=["q"], reference=reference, scorer=scorer, meta=meta)


def test_distinct_and_repetition_hand_computed():
    text = "a b a b a b"
    assert distinct_n(text, 1) == pytest.approx(2 / 6)
    assert distinct_n(text, 2) == pytest.approx(2 / 5)  # ab ba ab ba ab
    assert repetition_rate(text) == pytest.approx(1 - 2 / 3)  # abab baba abab
    assert repetition_rate("one two three four five") == 0.0
    assert distinct_n("", 1) == 0.0 and distinct_n("solo", 2) == 0.0 and repetition_rate("a b c") == 0.0
    assert set(score(prompt(), "a b")) == {"distinct_1", "distinct_2", "repetition_rate"}


def test_rouge_l_identical_is_one():
    text = "The council voted to extend the bicycle lanes to the northern districts."
    assert score(prompt("rouge_l", text), text)["rouge_l"] == pytest.approx(1.0)
    assert score(prompt("rouge_l", text), "Bananas are yellow.")["rouge_l"] < 0.2


@pytest.mark.parametrize("answer, reference, expected", [
    ("Adding it up gives 1000 + 234, so the answer is $1,234.", "1234", 1.0),
    ("There are 18 muffins left.", "18", 1.0),
    ("7 batches of 24 is 168, minus 150 is 18", "18", 1.0),
    ("The answer is 18.0", "18", 1.0),
    ("She has 3, 4 or 5 left.", "5", 1.0),
    ("The temperature is -4 degrees", "-4", 1.0),
    ("Answer: 17", "18", 0.0),
    ("I do not know.", "18", 0.0),
])
def test_math_exact(answer, reference, expected):
    assert math_exact(reference, answer) == expected
    assert score(prompt("math_exact", reference), answer)["exact_match"] == expected


def test_exact_contains_case_and_space_insensitive():
    p = prompt("exact", "Clara  Voss")
    assert score(p, "It was designed by clara voss in 1923.")["exact_match"] == 1.0
    assert score(p, "It was designed by Tennant and Hale.")["exact_match"] == 0.0


def test_aggregate_means_over_samples_that_have_the_key():
    agg = aggregate_quality([{"a": 1.0, "b": 0.0}, {"a": 0.0}, {"a": 0.5, "b": 1.0}])
    assert agg == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert aggregate_quality([]) == {}


@pytest.fixture(scope="module")
def problem0():
    raw = read_problems()[0]
    return raw, load_humaneval()[0]


def test_humaneval_canonical_passes(problem0):
    raw, p = problem0
    assert score(p, raw["canonical_solution"])["pass@1"] == 1.0


@pytest.mark.slow
def test_every_canonical_solution_passes_in_the_sandbox():
    """The sandbox contains programs without breaking honest ones: all 164 reference solutions pass (~20 s)."""
    failed = [p.id for raw, p in zip(read_problems(), load_humaneval())
              if score(p, raw["canonical_solution"])["pass@1"] != 1.0]
    assert failed == []


def test_humaneval_fenced_whole_function_passes(problem0):
    raw, p = problem0
    answer = "Here you go:\n\n```python\n" + raw["prompt"] + raw["canonical_solution"] + "```\nHope it helps."
    assert score(p, answer)["pass@1"] == 1.0
    # Unclosed fence (generation cut at max_new_tokens) still yields the code.
    assert score(p, "```python\n" + raw["prompt"] + raw["canonical_solution"])["pass@1"] == 1.0


def test_humaneval_wrong_answer_fails(problem0):
    _, p = problem0
    assert score(p, "    return False\n")["pass@1"] == 0.0
    assert score(p, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")["pass@1"] == 0.0
    assert score(p, "this is not python")["pass@1"] == 0.0


def test_humaneval_infinite_loop_times_out_quickly(problem0):
    _, p = problem0
    start = time.monotonic()
    assert score(p, "    while True:\n        pass\n", humaneval_timeout=1.0)["pass@1"] == 0.0
    assert time.monotonic() - start < 5


def test_extract_code_prefers_block_defining_entry_point():
    answer = "```bash\npip install x\n```\n```python\nimport math\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(answer, "def f(x):\n    '''doc'''\n", "f").endswith("def f(x):\n    return x\n")


def test_translation_is_scored_by_chrf():
    prompt = Prompt(id="t", category="translation", turns=["Translate"], reference="La bibliothèque ouvre à neuf heures.",
                    scorer="chrf")
    exact = score(prompt, "La bibliothèque ouvre à neuf heures.")["chrf"]
    close = score(prompt, "La bibliothèque ouvre a 9 heures.")["chrf"]
    wrong = score(prompt, "The library opens at nine.")["chrf"]
    assert exact == pytest.approx(1.0) and 0.3 < close < 1 and wrong < close
