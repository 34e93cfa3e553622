"""CSV tables: read with one-line errors, written safe to open in a spreadsheet.

Reading: :func:`parse_table` and :func:`read_table` give one clear line for a file that
is not CSV, lacks a column, or holds text where a number belongs.

Writing (OWASP, "CSV Injection"):

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by
Excel, LibreOffice and Google Sheets as a formula. Every text cell audit writes from
user text (file paths, class names, reasons) goes through :func:`neutralise`, which
puts a single quote in front of such a cell, as OWASP recommends; the spreadsheet then
shows the text. :func:`restore` undoes it when audit reads its own CSVs back, so a file
named ``-1.png`` or a class ``+`` round-trips. Numbers are left as they are: only
text columns are touched, and a negative number is not text.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import AuditError

DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def _is_text(col) -> bool:
    """A column of text: object dtype, or pandas' string dtype (the default from pandas 3)."""
    import pandas as pd

    return col.dtype == object or pd.api.types.is_string_dtype(col.dtype)


def neutralise(cell: str) -> str:
    """``cell`` as a spreadsheet shows it as text: ``'=1+2`` for ``=1+2``. A cell whose
    leading quotes hide a dangerous start gets one more quote, so :func:`restore` is exact."""
    if isinstance(cell, str) and cell.lstrip("'").startswith(DANGEROUS):
        return "'" + cell
    return cell


def restore(cell: str) -> str:
    """The text :func:`neutralise` was given."""
    if isinstance(cell, str) and cell[:1] == "'" and cell.lstrip("'").startswith(DANGEROUS):
        return cell[1:]
    return cell


def neutralise_frame(df):
    """A copy of ``df`` with every text (object) column neutralised."""
    text = [c for c in df.columns if _is_text(df[c])]
    if not text:
        return df
    out = df.copy()
    for c in text:
        out[c] = [neutralise(v) for v in out[c]]
    return out


def restore_frame(df, columns=None):
    """``df`` with the text columns (or ``columns``) restored, in place; returns it."""
    for c in (columns if columns is not None else [c for c in df.columns if _is_text(df[c])]):
        if c in df.columns and _is_text(df[c]):
            df[c] = [restore(v) for v in df[c]]
    return df


def parse_table(data: bytes, path: Path, columns, *, hint: str = "", numeric=(), **read_kw):
    """CSV bytes as a DataFrame; one clear line if unreadable, short of ``columns``, or
    not numeric where ``numeric`` says (a ``numeric`` column not in ``columns`` may be
    absent)."""
    import pandas as pd

    read_kw.setdefault("low_memory", False)  # the whole file is read anyway: one type a column, no DtypeWarning
    try:
        df = pd.read_csv(io.BytesIO(data), **read_kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[0]})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AuditError(f"{path}: missing column(s) {', '.join(missing)}{hint}")
    for c in numeric:
        if c not in df.columns:
            continue
        if pd.api.types.is_numeric_dtype(df[c].dtype) and not pd.api.types.is_bool_dtype(df[c].dtype):
            continue
        col = pd.to_numeric(df[c], errors="coerce")
        bad = (col.isna() & ~df[c].astype(str).str.lower().isin(["nan", ""])).to_numpy()
        if bad.any():
            i = int(bad.nonzero()[0][0])
            raise AuditError(f"{path}: column {c!r}, line {i + 2}: expected a number, found {str(df[c].iloc[i])[:40]!r}")
        df[c] = col
    return df


def read_table(path: str | os.PathLike, columns, *, hint: str = "", numeric=(), **read_kw):
    """A CSV outside any run (a user's file) as a DataFrame, with one-line errors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"{path}: does not exist") from None
    except IsADirectoryError:
        raise AuditError(f"{path}: is a folder, not a CSV file") from None
    return parse_table(data, path, columns, hint=hint, numeric=numeric, **read_kw)
