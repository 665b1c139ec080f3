"""The evaluation report's breakdowns: per source and per question type, counts and a change column."""

from docev.evaluation.report import breakdown_sections, breakdown_table


def _m(n, anls, em, **groups):
    return {"n": n, "anls": anls, "exact_match": em, **groups}


def test_breakdown_by_question_type_shows_counts_and_the_change():
    kind = {"n": 14, "anls": 0.857, "exact_match": 0.857}
    total = {"n": 15, "anls": 0.0, "exact_match": 0.0}
    results = {
        "tuned": _m(29, 0.414, 0.414, question_types={"kind": kind, "total": total}),
        "base": _m(29, 0.0, 0.0, question_types={"kind": {**kind, "anls": 0.0, "exact_match": 0.0}, "total": total}),
    }
    table = breakdown_table(results, "question_types")
    assert table[0] == ("| question type | questions | ANLS base | ANLS tuned | ANLS change | EM base | EM tuned "
                        "| EM change |")  # fmt: skip
    assert table[2] == "| kind | 14 | 0.000 | 0.857 | +0.857 | 0.000 | 0.857 | +0.857 |"
    assert table[3] == "| total | 15 | 0.000 | 0.000 | +0.000 | 0.000 | 0.000 | +0.000 |"
    assert breakdown_table(results, "sources") == []  # no label has per-source scores


def test_one_label_and_a_name_only_one_label_has():
    one = breakdown_table(
        {"tuned": _m(3, 0.5, 0.0, sources={"a": {"n": 3, "anls": 0.5, "exact_match": 0.0}})}, "sources"
    )
    assert one == ["| source | questions | ANLS | EM |", "|---|---|---|---|", "| a | 3 | 0.500 | 0.000 |"]
    b = {"n": 2, "anls": 0.5, "exact_match": 0.5, "f1": 0.25}
    results = {"base": _m(2, 0.0, 0.0, sources={"a": {"n": 2, "anls": 0.0, "exact_match": 0.0}}),
               "tuned": _m(2, 0.5, 0.5, sources={"b": b})}  # fmt: skip
    table = breakdown_table(results, "sources")
    assert "field F1 base" in table[0] and table[2].startswith("| a | 2 | 0.000 | n/a |  |")
    sections = breakdown_sections(results, level="###")
    assert sections[:2] == ["", "### By source"] and "### By question type" not in sections
