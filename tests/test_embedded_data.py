import json
import re

from loraplace.data.embedded import FAMILIES, NAME, records, tagged_records


def test_name():
    assert NAME == "loraplace-embedded-v1"


def test_deterministic_and_seed_dependent():
    assert records(60) == records(60)
    assert records(60, seed=1) == records(60, seed=1)
    assert records(60, seed=1) != records(60)


def test_prefix_property():
    big = records(240)
    for k in (0, 1, 17, 100, 239):
        assert records(k) == big[:k]
    assert records(50, seed=3) == records(120, seed=3)[:50]


def test_record_shape():
    rows = records(240)
    assert len(rows) == 240
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"].strip() and row["output"].strip()


def test_no_duplicates():
    rows = records(240)
    assert len({tuple(r.values()) for r in rows}) == 240


def test_family_variety():
    names = {family for family, _ in tagged_records(100)}
    assert len(names) >= 8
    assert len(FAMILIES) >= 10


def test_input_share_is_balanced():
    for rows in (records(100), records(240)):
        share = sum(1 for r in rows if r["input"]) / len(rows)
        assert 0.3 <= share <= 0.7


def _rows(family: str) -> list[dict[str, str]]:
    rows = [row for name, row in tagged_records(240) if name == family]
    assert len(rows) >= 5
    return rows


def test_arithmetic_answers_are_correct():
    for row in _rows("arithmetic"):
        question = row["instruction"]
        nums = [int(x) for x in re.findall(r"\d+", question)]
        expected = nums[0] * nums[1] if "each" in question else nums[0] + nums[1] - nums[2]
        assert row["output"].endswith(f"The answer is {expected}.")


def test_sorting_answers_are_correct():
    for row in _rows("sorting"):
        given = row["input"].split(", ")
        answer = row["output"].split(": ", 1)[1].rstrip(".").split(", ")
        if "words" in row["instruction"]:
            assert answer == sorted(given)
        else:
            descending = "largest to smallest" in row["instruction"]
            assert [int(x) for x in answer] == sorted(map(int, given), reverse=descending)


def test_json_answers_parse():
    for row in _rows("json_format"):
        parsed = json.loads(row["output"])
        assert [f"{k} = {v}" for k, v in parsed.items()] == row["input"].split("; ")
