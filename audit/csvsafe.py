"""CSV cells safe to open in a spreadsheet (OWASP, "CSV Injection").

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by
Excel, LibreOffice and Google Sheets as a formula. Every text cell audit writes from
user text (file paths, class names, reasons) goes through :func:`neutralise`, which
puts a single quote in front of such a cell, as OWASP recommends; the spreadsheet then
shows the text. :func:`restore` undoes it when audit reads its own CSVs back, so a file
named ``-1.png`` or a class ``+`` round-trips. Numbers are left as they are: only
text columns are touched, and a negative number is not text.
"""

from __future__ import annotations

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
