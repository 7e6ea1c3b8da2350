"""What a label column holds when no meta.json says it: classes or regression targets, and the class order.

Files made elsewhere spell one label many ways: CSV cells are strings, pandas writes an int column
holding a NaN as floats (1.0), class numbers may start at 1 (77 intents), and scores or ages look like
integers too. The rules here decide from every row of every split, and ask for meta.json's "type"
instead of guessing where the data could be read either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .columns import map_hint
from .files import DataError, Raw


def csv_number(value: Any, labels: Sequence[str]) -> Any:
    """A CSV cell is always a string: keep it if it names a label, else read it as an int or float."""
    if not isinstance(value, str) or value in labels:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def padded_code(value: Any) -> bool:
    """A CSV label that reads as a whole number but is not written as one ("01", "+1"): a code. Read as numbers,
    "01", "02", "10" became classes 1, 2, 10 (predictions printed `1` for `01`), and "1" and "01" merged into one
    class without a word; a file with such a cell keeps every label as the text it is."""
    if not isinstance(value, str):
        return False
    try:
        return str(int(value)) != value
    except ValueError:
        return False


def label_kind(label: Any) -> str:
    if isinstance(label, bool):
        return "bool"
    if isinstance(label, int):
        return "int"
    if isinstance(label, float):
        return "float"
    if isinstance(label, str):
        return "str"
    return type(label).__name__


# More distinct whole-number float labels than this read as regression targets, not classes: ambiguous.
MAX_WHOLE_CLASSES = 20


def whole(label: Any) -> Any:
    """1.0 -> 1: pandas writes an int column holding a NaN as floats, so `1.0` is a class written as a float."""
    if isinstance(label, float) and math.isfinite(label) and label.is_integer():
        return int(label)
    return label


def _indices(values: set[int]) -> bool:
    """Whether integers are class numbers, 0..n-1 or 1..n (77 intents), not scores or ages (18..90 with gaps)."""
    return min(values) in (0, 1) and max(values) - min(values) + 1 == len(values)


def name_order(names: Iterable[str]) -> list[str]:
    """Class names sorted numerically when every name is a number ("2" before "10"), else as text.
    The order is the class index, so it must not depend on how a file happened to spell its numbers."""
    names = set(names)
    try:
        values = {name: float(name) for name in names}
    except ValueError:
        return sorted(names)
    if not all(math.isfinite(v) for v in values.values()):
        return sorted(names)
    return sorted(names, key=lambda name: (values[name], name))


def infer(rows: list[Raw], classes: bool = False) -> tuple[str, list[str]]:
    """Task type and label names for data without meta.json, judged from all rows of all splits.

    Numeric classes are the values that occur, named by their value ("1", "2", "3": no unused "0"
    class) and ordered numerically; `_build` then maps each row by that name. Whole-number floats
    (1.0/0.0) are classes like the ints they stand for: the same labels written as 1/0 are already
    classification, and the float spelling is an artefact of pandas (an int column with a NaN). Only
    when there are many distinct whole values (more than MAX_WHOLE_CLASSES) could they as well be
    regression targets; then we refuse and ask for meta.json's "type" rather than guess (`classes`: the
    type says classification, so they are classes whatever their count). Many distinct ints are
    classes when they number them (0..n-1 or 1..n: intent ids); otherwise (scores, years, ages) the
    same question is asked.
    """
    if any("source" in r or "target" in r for _, r in rows) and not any("text" in r for _, r in rows):
        return "generation", []
    pair = any("text_pair" in r for _, r in rows)
    first: dict[str, str] = {}
    values = []
    spelled: dict[str, str] = {}  # each label string: where it first occurs
    for where, row in rows:
        if row.get("label") is None:  # null is a missing label: _examples names the row
            continue
        label = row["label"]
        kind = label_kind(label)
        if kind in ("list", "tuple", "dict"):
            _refuse_token_level(where, row)
            raise DataError(
                f"{where}: label {label!r} is a {kind}, not one class or number; several labels per row (multi-label) "
                "are not supported: give each row one label"
            )
        first.setdefault(kind, where)
        values.append(label)
        if kind == "str":
            spelled.setdefault(label, where)
    if "str" in first and len(first) > 1:
        other = next(k for k in first if k != "str")
        raise DataError(
            f"{first[other]}: mixed label types: {other} label here but str label at {first['str']}; "
            "use either class indices or label strings throughout"
        )
    if "bool" in first:
        raise DataError(f"{first['bool']}: boolean label; use 0/1 or a label string")
    kind = "pair_classification" if pair else "classification"
    if "float" in first:
        numbers = {whole(v) for v in values}
        if not all(isinstance(v, int) for v in numbers):
            return "regression", []
        if len(numbers) > MAX_WHOLE_CLASSES and not classes:
            raise DataError(
                f"{first['float']}: {len(numbers)} distinct whole-number labels ({min(numbers)}..{max(numbers)}) read as "
                'either classes or regression targets; say which in meta.json: "type": "classification" or "regression"'
            )
        return kind, name_order(str(v) for v in numbers)
    if "str" in first:
        _check_spellings(spelled)
        return kind, name_order(values)
    if "int" in first:
        ints = set(values)
        if len(ints) > MAX_WHOLE_CLASSES and not classes and not _indices(ints):
            raise DataError(
                f"{first['int']}: {len(ints)} distinct integer labels ({min(ints)}..{max(ints)}, not class numbers "
                '0..n-1 or 1..n) read as either classes or regression targets; say which in meta.json: "type": '
                '"classification" or "regression"'
            )
        return kind, name_order(str(v) for v in values)
    _refuse_token_level(*rows[0])
    raise DataError(
        f"{rows[0][0]}: no 'label' (classification) or 'source'/'target' (generation) field in any row; "
        + map_hint(sorted({k for _, r in rows[:1000] for k in r}), "label")
    )


def _refuse_token_level(where: str, row: dict) -> None:
    """Rows with a tag per token (CoNLL-style `tokens` and `ner_tags`, lists of one length) are token
    classification. The generic advice, mapping a column to `label`, led to a second refusal ("several labels
    per row"), so such rows are named for what they are."""
    lists = {k: v for k, v in row.items() if isinstance(v, (list, tuple)) and v}
    words = [k for k, v in lists.items() if all(isinstance(x, str) for x in v)]
    for word in words:
        tags = [k for k, v in lists.items() if len(v) == len(lists[word]) and list(v) != list(lists[word])]
        if tags:
            raise DataError(
                f"{where}: the rows hold a tag per token ({word!r} and {tags[0]!r}, lists of one length): token "
                "classification (NER, tagging) is not a task deltatune trains; it trains one label, score or "
                "target text per row (classification, regression, generation)"
            )


def _check_spellings(spelled: dict[str, str]) -> None:
    """Refuse label names that differ only in case or surrounding spaces ("positive" and "positive "): read as
    they are, each spelling became a class of its own and the model trained one class more, without a word."""
    same: dict[str, str] = {}
    for label, where in spelled.items():
        key = label.strip().casefold()
        if key in same and same[key] != label:
            raise DataError(
                f"{where}: label {label!r} differs from {same[key]!r} (first at {spelled[same[key]]}) only in case or "
                "spaces, so the two would be two classes; spell them alike in the file, or, if they are different "
                'classes, list every label in meta.json "labels" (or load_task(..., labels=[...]))'
            )
        same.setdefault(key, label)
