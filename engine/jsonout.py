"""JSON for scripts: every `--json` output goes through `dumps`, so a NaN or infinite number is written as null.

Python's json module writes NaN and Infinity by default, which are not JSON: `jq`, JavaScript and most parsers
reject the whole line (issue 22: `eval --json` printed {"loss": NaN, "perplexity": Infinity})."""
from __future__ import annotations

import json
import math


def finite_or_null(value):
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """json.dumps of finite_or_null(value); raises rather than ever writing NaN (allow_nan=False)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
