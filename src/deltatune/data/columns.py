"""Which of a user's columns is which field: `columns` mappings, the common aliases, and the hint that names them.

Users' files call the text "Review" or "sentence" and the label "Sentiment" or "category". A row is
read under deltatune's field names (`canonical`) before any check, and every refusal about a missing
field shows the row's own columns and the `--columns` mapping that would fix it (`map_hint`).
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from .files import COLUMN_ALIASES, DataError


def canonical(row: dict, columns: Mapping[str, str] | None) -> dict:
    """A row with its fields under the names deltatune reads (`columns` first, then the common aliases)."""
    if columns:  # a mapped column wins over one already of that name ("Review=text" beside a "text" column)
        mapped = {columns[k]: v for k, v in row.items() if k in columns}
        row = {k: v for k, v in row.items() if k not in columns and k not in mapped} | mapped
    label = row.get("label")
    if label is not None and not isinstance(label, str) and hasattr(label, "item"):  # numpy/torch scalars
        row["label"] = label.item()
    if "text" not in row and "text_pair" not in row and "question" in row:  # GLUE's QNLI, BoolQ: a question and
        second = next((c for c in ("sentence", "passage") if c in row), None)  # its context; read as one text,
        if second is not None:  # `sentence` alone became the text and the question was dropped without a word
            row["text"], row["text_pair"] = row["question"], row[second]
    folded: dict[str, list[str]] | None = None
    for key, aliases in COLUMN_ALIASES.items():
        if key not in row:
            for alias in aliases:
                if alias in row:
                    row[key] = row[alias]
                    break
            else:  # "Text", "Label", "Sentence" (a spreadsheet's or pandas' header): the one column of that name
                if folded is None:
                    folded = {}
                    for name in row:
                        if isinstance(name, str):
                            folded.setdefault(name.lower(), []).append(name)
                for alias in (key, *aliases):
                    if len(folded.get(alias, ())) == 1:
                        row[key] = row[folded[alias][0]]
                        break
    return row


FIELDS = ("text", "text_pair", "label", "source", "target", "references")


def check_columns(columns: Any) -> dict[str, str] | None:
    """A {their column: our field} mapping, or one line saying what a mapping must look like."""
    if not columns:
        return None
    if not isinstance(columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in columns.items()
    ):
        raise DataError(f'columns must map a column name to a field name, e.g. {{"Review": "text"}}; got {columns!r}')
    wrong = sorted(v for v in columns.values() if v not in FIELDS)
    if wrong:
        raise DataError(f"columns: {wrong[0]!r} is not a field deltatune reads; map columns to {', '.join(FIELDS)}")
    return dict(columns)


def check_mapped(columns: Mapping[str, str] | None, rows: Iterable[dict], where: str) -> None:
    """Refuse a mapping whose column no row has but one nearly has (`review` for `Review`): otherwise the
    refusal that follows says a field is missing, and the user's own typo goes unnamed. A mapped column
    with no near name is let be: one `--columns` serves every task of a study, each with its own columns."""
    if not columns:
        return
    seen: set[str] = set()
    for row in itertools.islice(rows, 10_000):
        seen.update(row)
    for name in (c for c in columns if c not in seen):
        close = [c for c in seen if c.lower() == name.lower()] or difflib.get_close_matches(name, sorted(seen), n=1)
        if close:
            have = ", ".join(repr(c) for c in sorted(seen)[:8])
            raise DataError(
                f"{where}: columns maps {name!r}, which no row has; did you mean {close[0]!r}? (column names are "
                f"case-sensitive; the rows have {have})"
            )


def map_hint(fields: list[str], wanted: str, labelled: bool = True) -> str:
    """How to say which of a user's columns is `wanted`: rename it, or map it (CLI, API, meta.json). Where the
    rows lack both a text and a label, the example maps both, so that one correction is enough (not for
    `labelled=False` rows, which `predict` reads: they need no label)."""
    have = ", ".join(repr(f) for f in fields[:8]) or "none"
    missing = [wanted]
    if wanted == "label" and not {"text", "source"} & set(fields):
        missing.append("text")
    elif wanted == "text" and "label" not in fields and labelled:
        missing.append("label")
    mapping: dict[str, str] = {}
    for field in missing:
        free = [f for f in fields if f not in mapping and f not in FIELDS] or ["COLUMN"]
        likely = [f for f in free if any(w in f.lower() for w in _LIKELY.get(field, ()))]
        mapping[(likely or (free[-1:] if field == "label" else free[:1]))[0]] = field
    if len(mapping) < len(missing):  # one column could only stand for one field
        mapping = dict(itertools.islice(mapping.items(), 1))
    names = " and ".join(repr(f) for f in mapping.values())
    cli = ",".join(f"{c}={f}" for c, f in mapping.items())
    api = ", ".join(f'"{c}": "{f}"' for c, f in mapping.items())
    return (
        f"the rows have {have}: rename columns to {names}, or map them, e.g. --columns {cli} "
        f'(load_task(..., columns={{{api}}}); "columns" in meta.json)'
        if len(mapping) > 1
        else f"the rows have {have}: rename a column to {wanted!r}, or map it, e.g. --columns {cli} "
        f'(load_task(..., columns={{{api}}}); "columns" in meta.json)'
    )


# words in column names that suggest a field, for the example in `map_hint` only
_LIKELY = {
    "label": ("label", "class", "sentiment", "category", "target", "tag", "intent", "score"),
    "text": ("text", "review", "sentence", "comment", "content", "tweet", "body", "message", "utterance"),
}
