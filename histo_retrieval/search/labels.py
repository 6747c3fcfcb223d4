"""The labels of an index's slides: a diagnosis (or subtype) and a patient, read from a CSV file.

    labels = read_labels("labels.csv", index.sources())   # {source id: (label, patient)}; refuses a bad file
    index.set_labels(labels)                              # retrieve.py label

The file has the columns `slide,label,patient`: `slide` is the file name as indexed or its full path,
`patient` may be empty or absent (the slide is then its own patient). Labels are never guessed from
names. A row naming no indexed slide, a slide named twice, an empty label, or a name two indexed
slides share is reported with its line number, and nothing is changed when any row is bad.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from histo_retrieval.errors import UserError
from histo_retrieval.search.index import SourceRow

__all__ = ["LABEL_COLUMNS", "read_labels"]

LABEL_COLUMNS = ("slide", "label", "patient")
SHOWN_PROBLEMS = 5  # rows named in the one-line error; the count says how many more


def read_labels(path: str | os.PathLike, sources: Sequence[SourceRow]) -> dict[int, tuple[str, str | None]]:
    """{source id: (label, patient or None)} of every row of the labels file; UserError naming each bad
    row by its line number (the first few, and how many) when any is bad."""
    by_path = {os.path.abspath(row.path): row for row in sources}
    by_name: dict[str, list[SourceRow]] = {}
    for row in sources:
        by_name.setdefault(row.name, []).append(row)
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            missing = [column for column in LABEL_COLUMNS[:2] if column not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: no {' or '.join(missing)} column; the header must be "
                                f"{','.join(LABEL_COLUMNS)} (patient may be left out)")
            rows = [(reader.line_num, entry) for entry in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: cannot be read as a CSV file ({err})") from None
    labels: dict[int, tuple[str, str | None]] = {}
    seen: dict[int, int] = {}
    problems: list[str] = []
    for line, entry in rows:
        name, label = (entry.get("slide") or "").strip(), (entry.get("label") or "").strip()
        patient = (entry.get("patient") or "").strip() or None
        if "/" in name or os.sep in name:
            found = by_path.get(os.path.abspath(name))
            matches = [found] if found else []
        else:
            matches = by_name.get(name, [])
        if not name:
            problems.append(f"line {line}: no slide")
        elif not matches:
            problems.append(f"line {line}: {name} is not an indexed slide")
        elif len(matches) > 1:
            problems.append(f"line {line}: {name} names {len(matches)} indexed slides; give its full path")
        elif not label:
            problems.append(f"line {line}: {name} has an empty label")
        elif matches[0].id in seen:
            problems.append(f"line {line}: {name} is listed twice (also on line {seen[matches[0].id]})")
        else:
            seen[matches[0].id] = line
            labels[matches[0].id] = (label, patient)
    if problems:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UserError(f"{path}: {len(problems)} bad row(s), nothing changed: "
                        f"{'; '.join(problems[:SHOWN_PROBLEMS])}{more}")
    if not labels:
        raise UserError(f"{path}: no rows; write one row per slide: {','.join(LABEL_COLUMNS)}")
    return labels
