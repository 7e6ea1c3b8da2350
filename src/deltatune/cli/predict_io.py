"""`deltatune predict --input FILE --output FILE`: a saved delta over a user's own unlabeled rows.

Texts on the command line suit a try-out; real use is a file of thousands of rows, which went in as
one batch (all rows padded together: memory grew with the file) and came out as printed lines to be
parsed back. Here the rows are read as training reads them (JSONL, CSV with its header's delimiter,
TSV, or a .txt of one text per line; the columns training mapped, or --columns), predicted in batches
with a progress bar, and written next to their own fields as JSONL or CSV in one atomic rename.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

OUTPUT_SUFFIXES = (".jsonl", ".csv")
DEFAULT_MODEL, DEFAULT_MAX_LENGTH, DEFAULT_BATCH = "minilm-l6", 128, 64  # eval and predict without a record
FIELD = "prediction"


def read_rows(path: str, columns: dict[str, str] | None, generation: bool = False) -> list[tuple[dict, dict]]:
    """(the row as the file has it, the row with text/text_pair as training names them); '-': stdin lines.

    For a generation delta the input is the `source` a generation task's rows have (its own test file: the
    text to predict from was asked for, and the hint named the WebNLG category column)."""
    from ..data.columns import canonical, map_hint
    from ..data.examples import field_text
    from ..data.files import DataError, read_text_lines
    from ..data.files import read_rows as read_file_rows

    if path == "-" or path.endswith(".txt"):
        lines = sys.stdin.read().splitlines() if path == "-" else read_text_lines(Path(path))
        where = "stdin" if path == "-" else path
        raw = [(f"{where}, line {n}", {"text": t}) for n, t in enumerate(lines, 1) if t.strip()]
    else:
        raw = read_file_rows(Path(path))
    if not raw:
        raise DataError(f"{path}: no rows to predict")
    rows = []
    present = {key for _, row in raw for key in canonical(dict(row), columns)}  # a CSV drops a blank cell's key
    source = generation and "source" in present and "text" not in present
    for where, row in raw:
        mapped = canonical(dict(row), columns)
        if source and "source" in mapped:
            mapped["text"] = mapped["source"]
        if "text" not in present and not source:
            raise DataError(f"{where}: no 'text' to predict from; {map_hint(sorted(row), 'text', labelled=False)}")
        field_text(where, mapped, "source" if source else "text", elsewhere=True)
        rows.append((row, mapped))
    return rows


def examples_from(read: list[tuple[dict, dict]], pairs: bool) -> list:
    """Examples of the mapped rows; a pair delta needs a text_pair in every row (a single text is refused)."""
    from ..data.columns import map_hint
    from ..data.files import DataError
    from ..data.tasks import Example

    if pairs:
        for n, (row, mapped) in enumerate(read, 1):
            if not isinstance(mapped.get("text_pair"), str):
                raise DataError(
                    f"row {n}: this delta was trained on text pairs and the row has no 'text_pair'; "
                    f"{map_hint(sorted(row), 'text_pair')}"
                )
    return [Example(m["text"], m.get("text_pair") if pairs else None) for _, m in read]


def check_output(path: str | None) -> None:
    """Before the model loads: an output the run could not write is refused first."""
    if path is None:
        return
    out = Path(path)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output {path}: write {' or '.join(OUTPUT_SUFFIXES)} (the format follows the suffix)")
    if out.is_dir():
        raise ValueError(f"--output {path} is a folder; name a file")


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_all(examples: list, size: int, predict: Callable[[list], list], progress: bool) -> list:
    """Predictions in batches of `size` (a file of any length in bounded memory)."""
    from tqdm.auto import tqdm

    out: list = []
    with tqdm(total=len(examples), desc="predict", unit="row", disable=not progress) as bar:
        for chunk in batches(examples, size):
            out.extend(predict(list(chunk)))
            bar.update(len(chunk))
    return out


def _cell(value: Any) -> str:
    """A cell JSON has no type for (a Parquet file's timestamps, dates, bytes, decimals) as text, as CSV writes it."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def write_rows(path: str, rows: list[dict], outputs: list[str]) -> str:
    """Each input row, with its own columns, and its prediction added; JSONL or CSV by suffix, in one rename.
    Returns the column's name: `prediction`, or `prediction_2`, ... where the rows have one of that name already
    (the output of an earlier predict, fed back in: its predictions were overwritten without a word)."""
    from ..core.atomic import write_file

    taken = {k for row in rows for k in row}
    field = next(f for f in (FIELD, *(f"{FIELD}_{i}" for i in range(2, len(taken) + 3))) if f not in taken)
    records = [{**row, field: out} for row, out in zip(rows, outputs, strict=True)]
    if Path(path).suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False, default=_cell) + "\n" for r in records)
    else:
        fields = list(dict.fromkeys(k for r in records for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        text = buffer.getvalue()
    write_file(path, text)
    return field


def emit(
    args: Any, dm: Any, task: Any, objective: Any, examples: list, rows: list[dict], texts: list[str], size: int
) -> int:
    """Predict `examples` in batches of `size`; write them beside their rows to --output, else print them."""
    import torch

    from ..train.objectives import GenerationObjective

    def predict(chunk: list) -> list[str]:
        if isinstance(objective, GenerationObjective):
            return objective.generate(dm, chunk)
        label = 0.0 if task.type == "regression" else 0
        with torch.inference_mode():
            raw = objective.predict(dm, objective.collate([type(e)(e.text, e.text_pair, label) for e in chunk]))
        return [f"{v:.4f}" if task.type == "regression" else task.labels[v] for v in raw]

    outputs = predict_all(examples, size, predict, progress=args.output is not None)
    if args.output:
        field = write_rows(args.output, rows, outputs)
        column = "" if field == FIELD else f" (column {field!r}: the rows have a {FIELD!r} column already)"
        print(f"{len(outputs)} predictions written to {args.output}{column}")
        return 0
    for text, out in zip(texts, outputs, strict=True):
        print(f"{out}\t{text}")
    return 0


def texts_to_examples(texts: list[str], pairs: bool) -> list:
    """Command-line texts as Examples; pairs are written 'first ||| second'."""
    from ..data.tasks import Example

    if not pairs:
        return [Example(t) for t in texts]
    out = []
    for text in texts:
        first, sep, second = text.partition(" ||| ")
        if not sep:
            raise ValueError(f"this delta was trained on text pairs; write each input as 'first ||| second' ({text!r})")
        out.append(Example(first, second))
    return out
