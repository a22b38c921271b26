"""The one error base the command line knows."""

from __future__ import annotations


class UserError(Exception):
    """Something the person running segserve can fix (a missing or malformed file, a model
    that cannot be served, an option that does not fit): the CLI prints the message and
    exits with 1, without a traceback. Each part raises its own subclass."""
