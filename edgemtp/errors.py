"""Errors that are the user's to fix.

Anything raised as ``UserError`` is printed by the CLI as one line,
``error: <message>``, and the process exits with code 2 and no traceback.
The message must name the problem *and* the fix.
"""


class UserError(Exception):
    """Bad input (a path, a flag, a checkpoint) that the user can correct."""
