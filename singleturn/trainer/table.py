"""Markdown table cells shared by the evaluation report (`evaluation.py`) and the comparison report
(`compare_report.py`): a missing value is "-", never "nan" or "None"."""

from __future__ import annotations


def pct(v, std=None) -> str:
    """A fraction as a percentage with one decimal, `± std` (in points) when a spread is given."""
    if v is None:
        return "-"
    return f"{100.0 * float(v):.1f}%" + (f" ± {100.0 * float(std):.1f}" if std else "")


def num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(float(v))
