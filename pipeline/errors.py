"""Error types the CLI maps to exit codes: InputError -> 2 (bad input or usage), InternalError -> 1."""

from __future__ import annotations


class InventoryError(Exception):
    """Base class; the message is one line that names the file and the fix."""

    exit_code = 1


class InputError(InventoryError):
    """Bad input or usage: the user can fix it (exit code 2)."""

    exit_code = 2


class InternalError(InventoryError):
    """A failure inside the tool (exit code 1)."""

    exit_code = 1
