"""The one error type every command reports as a single readable line (exit code 2, no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or machine: printed as one line, exit code 2, no traceback."""
