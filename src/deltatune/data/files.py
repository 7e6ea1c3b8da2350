"""Where task rows come from on disk: the names, the error type, and readers that keep file and line.

Every reader returns rows paired with "<file>, line <n>", so any later validation error can say
exactly where a bad row is.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

TASK_TYPES = ("classification", "pair_classification", "regression", "generation")
SPLITS = ("train", "dev", "test")
# Hugging Face and many repos call the dev split "validation"; we keep one canonical name.
SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev", "eval": "dev"}
FILE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json", ".parquet")
TEXT_SUFFIXES = (".csv", ".tsv")  # no types: numbers arrive as strings (see examples.csv_number)
ENV_VAR = "DELTATUNE_DATA"

# Column names of common public datasets (GLUE, SuperGLUE, E2E) accepted when the canonical one is absent.
COLUMN_ALIASES = {
    "text": ("sentence", "sentence1", "premise", "question1", "content", "document"),
    "text_pair": ("sentence2", "hypothesis", "question2"),
    "label": ("labels", "score"),
    "source": ("meaning_representation", "mr", "input"),
    "target": ("human_reference", "ref", "output"),
}


class DataError(ValueError):
    """A task that cannot be found or a row that cannot be read; the message names file and line."""


# ----------------------------------------------------------------------------- reading raw rows

# A raw row with where it came from, e.g. ("/x/train.jsonl, line 3", {...}).
Raw = tuple[str, dict]


def _read_jsonl(path: Path) -> list[Raw]:
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _read_json(path: Path) -> list[Raw]:
    """A .json file as the tools that write one lay it out: an array of row objects (pandas
    `orient="records"`), columns of values or of index-keyed values (pandas' default `to_json`), pandas'
    "split", "table" and "index" layouts, or JSON lines under a .json name (what `datasets`' `to_json` writes)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line
            return _read_jsonl(path)
        raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and {"columns", "data"} <= set(data) and isinstance(data["data"], list):
        data = [dict(zip(data["columns"], r, strict=False)) for r in data["data"]]  # pandas orient="split"
    elif isinstance(data, dict) and {"schema", "data"} <= set(data) and isinstance(data["data"], list):
        data = data["data"]  # pandas orient="table": the records, with their index
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = _keyed_table(path, data)
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        sizes = {len(v) for v in data.values()}
        if len(sizes) != 1:
            raise DataError(f"{path}: its columns have different lengths ({sorted(sizes)}); is it one table?")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    elif isinstance(data, dict) and data:  # one row (a one-row split datasets' to_json wrote as a JSON line)
        for key, value in data.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                raise DataError(
                    f"{path}: its {key!r} holds {len(value)} row objects; save those alone, as an array of row "
                    "objects (pandas orient='records') or JSON lines"
                )
        data = [data]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected an array of row objects or an object of columns, got a JSON {type(data).__name__}"
        )
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            hint = " (a table without column names, like pandas' orient='values': write orient='records')"
            raise DataError(
                f"{path}, item {i}: expected a JSON object per row, got {type(row).__name__}"
                + (hint if isinstance(row, list) else "")
            )
        rows.append((f"{path}, item {i}", row))
    return rows


# Field names that say which side of a keyed table holds the columns (files.COLUMN_ALIASES and the canonical ones).
_FIELDS = {*COLUMN_ALIASES, *(n for names in COLUMN_ALIASES.values() for n in names), "references"}


def _keyed_table(path: Path, data: dict[str, dict]) -> list[dict]:
    """Rows of an object of objects: pandas' default "columns" layout ({column: {index: value}}) or its "index"
    layout ({index: {column: value}}). Field names on one side, else number keys on the other, say which; keys
    that are numbers on both sides (pd.read_csv(header=None).to_json()) could be either, read transposed
    without an error, so they are refused. Columns are joined by their index keys, not by position."""
    inner = list(dict.fromkeys(k for v in data.values() for k in v))
    outer_named, inner_named = bool(_FIELDS & set(data)), bool(_FIELDS & set(inner))
    outer_numbers, inner_numbers = all(k.isdigit() for k in data), all(k.isdigit() for k in inner)
    if inner_named and not outer_named or outer_numbers and not inner_numbers and not outer_named:
        return list(data.values())  # orient="index": rows keyed by their index
    if outer_numbers and inner_numbers and not outer_named:
        raise DataError(
            f"{path}: its keys and those of every object in it are numbers, so it could hold columns (pandas' "
            "default to_json) or rows (orient='index'); write it as an array of row objects (orient='records')"
        )
    rows = []
    for index in inner:
        for column, values in data.items():
            if index not in values:
                raise DataError(f"{path}: column {column!r} has no row {index!r}, which other columns have")
        rows.append({column: values[index] for column, values in data.items()})
    return rows


def parquet_class_names(path: Path) -> dict[str, SimpleNamespace]:
    """The ClassLabel columns `datasets` recorded in a Parquet file's schema (`to_parquet`, the hub's parquet
    conversion): {column: an object with `.names`}, shaped like a `datasets` feature. Without them its labels
    read as the bare ints "0", "1", ...; with them as the names, numbered in the ClassLabel's order."""
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
        features = json.loads(meta.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except Exception:  # no pyarrow, or no readable metadata: the file reads without names (see _read_parquet)
        return {}
    return {
        column: SimpleNamespace(names=[str(n) for n in feature["names"]])
        for column, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list)
    }


def _read_parquet(path: Path) -> list[Raw]:
    """A Parquet file (what the Hugging Face hub and pandas `to_parquet` store), read with pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or save the table as .jsonl or .csv"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors have no common base worth naming
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return [(f"{path}, row {i}", row) for i, row in enumerate(table.to_pylist())]


def _delimiter(header: str) -> str:
    """',' unless the header line has none and one of ';', tab, '|': Excel writes ';' where the decimal
    separator is a comma, and a ';' file read with ',' is one column named 'text;label' whose error
    ("no 'label' field") hid the cause."""
    if "," not in header:
        for candidate in (";", "\t", "|"):
            if candidate in header:
                return candidate
    return ","


def _read_csv(path: Path) -> list[Raw]:
    tsv = path.suffix == ".tsv"
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        # TSV (GLUE's format) has no quoting: a text that starts with '"' would otherwise open a quoted
        # field that swallows the following lines, tabs and labels into one row without a word
        if tsv:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            delimiter = _delimiter(fh.readline())
            fh.seek(0)
            reader = csv.DictReader(fh, delimiter=delimiter)
        _check_header(path, reader.fieldnames or [])
        end = 1  # the header line
        for row in reader:
            start, end = end + 1, reader.line_num
            where = f"{path}, line {start}"
            if None in row:
                raise DataError(f"{where}: more fields than the header {reader.fieldnames}")
            if tsv:
                _check_unquoted(where, row)
            # CSV has no types: empty cells are absent, numbers are parsed later against the task's labels.
            rows.append((where, {k: v for k, v in row.items() if v not in ("", None)}))
        fields = reader.fieldnames or []  # read inside: DictReader reads the header lazily (a 0-byte file
    if not tsv:  # read it after the close and failed with "I/O operation on closed file")
        _check_swallowed(rows, fields, delimiter)
    return rows


_CSV_QUOTED = re.compile(r'"(?:[^"]|"")*""(?:[^"]|"")*"')  # a whole cell in quotes, its own quotes doubled


def _check_unquoted(where: str, row: dict[str, str | None]) -> None:
    """A .tsv is read as GLUE writes it, unquoted; pandas' `to_csv(sep=TAB)` quotes a cell holding a quote
    (he said "great" became the cell "he said ""great"" twice"), trained on as that literal text, and a text
    holding a line break became two rows, the first refused as "label is empty". Refused, with the fixes.
    """
    cut = [c for c in row.values() if isinstance(c, str) and c.startswith('"') and not c.endswith('"')]
    if cut and None in row.values():  # fewer cells than the header, after a quote left open: a quoted line break
        raise DataError(
            f"{where}: the cell {cut[0][:40]!r} opens a CSV quote and the row ends there: a text with a line break "
            "in CSV quotes (pandas' to_csv(sep='\\t') writes them); a .tsv is read one row per line, unquoted: "
            "remove the line breaks from the texts, or save as .csv"
        )
    for column, cell in row.items():
        if isinstance(cell, str) and _CSV_QUOTED.fullmatch(cell):
            raise DataError(
                f"{where}: the {column!r} cell {cell[:40]!r} is in CSV quotes (pandas' to_csv(sep='\\t') writes them); "
                "a .tsv is read unquoted, as GLUE writes it: save with quoting=csv.QUOTE_NONE, or as .csv"
            )


def _check_header(path: Path, fields: list[str]) -> None:
    """Refuse a header that names a column twice: csv.DictReader keeps the last such cell of every row, so
    the first column's texts vanished without a word. Unnamed columns (a trailing delimiter) are not read."""
    seen: set[str] = set()
    for i, name in enumerate(fields):
        if name in seen and name.strip():
            first = fields.index(name)
            raise DataError(
                f"{path}, line 1: the header names column {name!r} twice (columns {first + 1} and {i + 1}), so "
                f"one column's cells would be dropped; rename one (e.g. column {first + 1} to '{name}_{first + 1}')"
            )
        seen.add(name)


def _check_swallowed(rows: list[Raw], fields: list[str], delimiter: str = ",") -> None:
    """Refuse a quoted field that holds whole rows of the file: a quote opened and never closed.

    CSV lets a quoted text span lines, so `"bad movie,0` is legal and swallows the lines after it into
    one text until the next quote, under the later row's label, without a word. A text line that parses
    as a complete row whose label the file uses elsewhere is the mark of that; real multi-line texts
    (reviews with paragraphs) do not end their lines in `,<label>`.
    """
    if "label" not in fields:
        return
    labels = {row["label"] for _, row in rows if "label" in row}
    for where, row in rows:
        for key, value in row.items():
            if key == "label" or "\n" not in value:
                continue
            for line in value.splitlines()[:-1]:
                cells = next(csv.reader([line], delimiter=delimiter), [])
                if len(cells) == len(fields) and cells[fields.index("label")] in labels:
                    raise DataError(
                        f"{where}: the quoted {key!r} runs over several lines and holds {line!r}, a row of its own: "
                        "a quote opened and not closed; close it (write a quote inside a text as two) or remove it"
                    )


def _not_utf8(path: Path) -> DataError:
    """Where in the file the first byte that is not UTF-8 sits (the decoder's own offset is per chunk)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return DataError(f"{path}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8; re-save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text; re-save the file as UTF-8")


def _read_file(path: Path) -> list[Raw]:
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        rows = readers.get(path.suffix, _read_csv)(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not rows:
        raise DataError(f"{path}, line 1: empty file (no rows)")
    return rows


def _split_file(folder: Path, split: str) -> Path | None:
    names = [split] + [alias for alias, canon in SPLIT_ALIASES.items() if canon == split]
    found = [folder / f"{name}{suffix}" for name in names for suffix in FILE_SUFFIXES]
    found = [path for path in found if path.exists()]
    if len(found) > 1:  # one would be read and the other ignored without a word (an old CSV beside its JSONL)
        raise DataError(
            f"{folder}: several files for the {split} split ({', '.join(p.name for p in found)}); keep one of them"
        )
    return found[0] if found else None


# ----------------------------------------------------------------------------- validating rows into Examples
def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}, line 1: meta.json must hold a JSON object")
    return meta


def _count_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            return sum(1 for line in fh if line.strip())
    return len(_read_file(path))


def read_rows(path: Path) -> list[Raw]:
    """A data file's rows (FILE_SUFFIXES) with where each came from, as task loading reads them (public for
    readers of unlabeled rows, e.g. `deltatune predict --input`)."""
    return _read_file(path)


def read_text_lines(path: Path) -> list[str]:
    """A UTF-8 text file's lines; a byte that is not UTF-8 is refused with its line, as data files are."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
