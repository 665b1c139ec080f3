"""ANLS / exact match / field F1 on hand-checked cases, and rapidfuzz against a plain edit distance."""

import random

import pytest

from docev.evaluation.scores import anls, exact_match, field_f1, normalize, relaxed_match, score, summarize


@pytest.mark.parametrize(
    ("prediction", "golds", "want_anls", "want_exact"),
    [
        ("Acme Corp", ["acme corp"], 1.0, True),  # case
        ("  acme \t  corp\n", ["Acme Corp"], 1.0, True),  # trim + collapse whitespace
        ("", ["42.50"], 0.0, False),  # empty prediction
        ("abcx", ["abcd"], 0.75, False),  # 1 edit / 4
        ("abxy", ["abcd"], 0.0, False),  # NL = 2/4 = 0.5: the threshold edge scores 0 (NL < τ is required)
        ("abxde", ["abcde"], 0.8, False),  # 1 / 5
        ("abcd", ["abc"], 0.75, False),  # normalised by the longer string: 1 / 4
        ("12.5", ["12.50"], 0.8, False),
        ("2024-01-05", ["5 Jan 2024", "2024-01-05"], 1.0, True),  # several golds: the best one
        ("abcf", ["abcd", "abce", "zzzz"], 0.75, False),
        ("totally wrong", ["Initech"], 0.0, False),
    ],
)
def test_anls_and_exact(prediction, golds, want_anls, want_exact):
    assert anls(prediction, golds) == pytest.approx(want_anls)
    assert exact_match(prediction, golds) is want_exact


def test_threshold_is_configurable():
    assert anls("abxy", ["abcd"], threshold=0.6) == pytest.approx(0.5)


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_anls_matches_a_plain_edit_distance():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 8)))
        b = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 8)))
        na, nb = normalize(a), normalize(b)
        nl = _levenshtein(na, nb) / max(len(na), len(nb), 1)
        assert anls(a, [b]) == pytest.approx(1 - nl if nl < 0.5 else 0.0)


GOLD = '{"total": "12.50", "date": "2024-01-05"}'


@pytest.mark.parametrize(
    ("prediction", "want"),
    [
        ('{"date": "2024-01-05", "total": "12.50"}', (1.0, True)),  # key order does not matter
        ('{"total": " 12.50 ", "date": "2024-01-05"}', (1.0, True)),  # values are normalised
        ('{"total": "12.50"}', (2 / 3, True)),  # p 1, r 1/2
        ('{"total": "12.50", "date": "2025", "x": "y"}', (0.4, True)),  # p 1/3, r 1/2
        ('{"Total": "12.50"}', (0.0, True)),  # keys are compared as written
        ("total 12.50", (0.0, False)),  # not JSON
        ('["12.50"]', (0.0, False)),  # JSON but not an object
    ],
)
def test_field_f1(prediction, want):
    f1, parsed = field_f1(prediction, [GOLD])
    assert f1 == pytest.approx(want[0]) and parsed is want[1]


def test_field_f1_nested_and_non_json_gold():
    gold = '{"buyer": {"name": "Ada"}, "items": ["Toner", 3]}'
    assert field_f1('{"buyer": {"name": "ada"}, "items": ["toner", 3]}', [gold]) == (1.0, True)
    assert field_f1('{"buyer": {"name": "Ada"}}', [gold]) == (pytest.approx(0.5), True)
    assert field_f1("Acme", ["Acme"]) is None
    assert score("Acme", ["Acme"]).f1 is None


def test_summary_per_source_and_type():
    rows = [
        {"source": "a", "question_type": "total", "anls": 1.0, "exact": True},
        {"source": "a", "question_type": "name", "anls": 0.5, "exact": False},
        {"source": "b", "question_type": None, "anls": 0.0, "exact": False, "f1": 0.5, "json_parsed": True},
    ]
    s = summarize(rows)
    assert s["n"] == 3 and s["anls"] == pytest.approx(0.5) and s["exact_match"] == pytest.approx(1 / 3)
    assert s["f1"] == 0.5 and s["json_parse_rate"] == 1.0 and s["json_questions"] == 1
    assert s["sources"]["a"] == {"n": 2, "anls": 0.75, "exact_match": 0.5}
    assert set(s["question_types"]) == {"total", "name"}
    with pytest.raises(ValueError, match="at least one gold"):
        score("x", [])


@pytest.mark.parametrize(
    ("prediction", "golds", "want"),
    [
        ("12", ["12.5"], True),  # |12 - 12.5| / 12.5 = 4 % ≤ 5 %
        ("13.2", ["12.5"], False),  # 5.6 %
        ("11.875", ["12.5"], True),  # exactly 5 % below: the edge counts
        ("5%", ["0.05"], True),  # a trailing % divides by 100
        ("52%", ["0.5"], True),  # 0.52 vs 0.5: 4 %
        ("0", ["0"], True),  # a gold of 0 compares as text
        ("0.0", ["0"], False),
        ("Yes", ["yes"], True),  # text: lowercased equality
        ("yes ", [" Yes"], True),  # trimmed
        ("Blue bar", ["blue"], False),  # text is not partial
        ("-10", ["-10.4"], True),  # relative to |gold|
        ("1,000", ["1000"], False),  # not a float (the reference reads no thousands separator)
        ("99", ["abc", "100"], True),  # any gold
    ],
)
def test_relaxed_accuracy_hand_worked(prediction, golds, want):
    assert relaxed_match(prediction, golds) is want


def _pix2struct_relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's reference (google-research/pix2struct, pix2struct/metrics.py), copied as the independent check."""

    def _to_float(text: str):
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            return float(text)
        except ValueError:
            return None

    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def test_relaxed_accuracy_matches_the_chartqa_reference():
    rng = random.Random(0)
    words = ["yes", "No", "blue", "0", "", "abc"]
    for _ in range(3000):

        def one() -> str:
            kind = rng.random()
            if kind < 0.6:
                return f"{rng.uniform(-200, 200):.{rng.randint(0, 3)}f}" + ("%" if rng.random() < 0.2 else "")
            return rng.choice(words)

        target, prediction = one(), one()
        if rng.random() < 0.3 and target not in words:  # near misses around the 5 % edge
            prediction = f"{float(target.rstrip('%')) * rng.uniform(0.93, 1.07):.4f}" + (
                "%" if target.endswith("%") else ""
            )
        assert relaxed_match(prediction, [target]) is _pix2struct_relaxed_correctness(target, prediction), (
            target,
            prediction,
        )
