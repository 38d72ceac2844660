"""``labels.csv``: the one reader of study labels, for training, evaluation, ``models create`` and the
retrain alike.

Why one reader: four used to exist with different rules (two refused a UTF-8 byte-order mark that the
other two accepted, one counted any label but "normal" as abnormal, two let a repeated study silently
take its last label), so the same file could mean different things to the model that trained on it and
to the calibration that set its threshold. It lives on the triage side because ``triage models create``
reads labels and triage never imports training; training imports it from here.

The format (what ``training synth`` writes and a curator's spreadsheet exports):

* UTF-8, with or without a byte-order mark; LF or CRLF line ends;
* a header naming at least ``study_uid`` and ``label``; ``lesion`` is optional, and any further columns
  (ground truth, notes) are allowed and ignored here;
* ``label`` is ``normal`` or ``abnormal`` (any case, surrounding spaces ignored); ``lesion`` may be
  empty; blank rows are skipped;
* each study at most once.

Anything else is a :class:`LabelsError` whose message starts with ``<file>:<line>:``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import NamedTuple

LABELS = ("normal", "abnormal")
REQUIRED_COLUMNS = ("study_uid", "label")


class LabelsError(ValueError):
    """labels.csv cannot be read or has a bad row; the message names the file and the line."""


class Label(NamedTuple):
    """One study's label. A tuple ``(label, lesion)`` so callers can unpack it."""

    label: str  # "normal" or "abnormal"
    lesion: str = ""  # the lesion type of an abnormal study, "" when not given

    @property
    def abnormal(self) -> bool:
        return self.label == "abnormal"


def read_labels(path: str | os.PathLike[str]) -> dict[str, Label]:
    """labels.csv -> ``{study_uid: Label}`` in file order; :class:`LabelsError` naming file and line."""
    p = Path(path)
    try:
        fh = p.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"{p}: cannot read labels file: {exc.strerror or exc}") from None
    out: dict[str, Label] = {}
    first_line: dict[str, int] = {}
    with fh:
        reader = csv.reader(fh, strict=True)  # a half-quoted row is a broken file, not a guess
        try:
            header = [c.strip().lower() for c in next(reader, [])]
            if not all(c in header for c in REQUIRED_COLUMNS):
                raise LabelsError(f"{p}:1: header must contain study_uid,label[,lesion], got {header}")
            col = {name: header.index(name) for name in (*REQUIRED_COLUMNS, "lesion") if name in header}
            for row in reader:
                _add_row(p, reader.line_num, [v.strip() for v in row], col, out, first_line)
        except UnicodeDecodeError as exc:
            raise LabelsError(f"{p}:{reader.line_num + 1}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise LabelsError(f"{p}:{reader.line_num}: {exc}") from None
    return out


def _add_row(p: Path, line: int, row: list[str], col: dict[str, int], out: dict[str, Label],
             first_line: dict[str, int]) -> None:
    """Validate one data row into ``out``; blank rows are skipped."""
    if not any(row):
        return

    def cell(name: str) -> str:
        i = col.get(name)
        return row[i] if i is not None and i < len(row) else ""

    uid, raw, lesion = cell("study_uid"), cell("label"), cell("lesion")
    if not uid:
        raise LabelsError(f"{p}:{line}: empty study_uid")
    label = raw.lower()
    if label not in LABELS:
        raise LabelsError(f"{p}:{line}: study {uid}: label {raw!r} is not 'normal' or 'abnormal'")
    if uid in out:
        raise LabelsError(f"{p}:{line}: study {uid} is labelled twice (first on line {first_line[uid]})")
    out[uid] = Label(label, lesion)
    first_line[uid] = line
