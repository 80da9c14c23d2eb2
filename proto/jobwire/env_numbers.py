"""The one syntax of numeric settings, for the service, the bridge and the dashboard.

Python's int() and float() take more than an operator writes: `1_0` (10), Arabic-Indic
or full-width digits, `+10`, `nan`, `infinity`. A setting of `1_0` (a typo of 10, or
of 1.0) then started with a value nobody wrote. A setting takes ASCII digits, with a
fraction and an exponent where a number may have them, and a leading `-` so that a
negative value is refused by its bound; spaces, tabs and line breaks at its ends are
dropped, as the env file drops them.
"""

from __future__ import annotations

import re

_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_ENDS = " \t\r\n"


def whole_number(text: str) -> int | None:
    """`text` as a whole number (`12`, `-1`), or None when it is written otherwise."""
    text = text.strip(_ENDS)
    return int(text) if _WHOLE.fullmatch(text) else None


def decimal_number(text: str) -> float | None:
    """`text` as a finite number (`12`, `0.5`, `1e3`), or None when it is written
    otherwise (`nan`, `inf`, `1_0.5`, `+1`); a float too large to hold is None too."""
    text = text.strip(_ENDS)
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if value not in (float("inf"), float("-inf")) else None
