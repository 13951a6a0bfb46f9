"""Errors the command line maps to exit statuses (see lema/cli.py), and how an error from a library is quoted
in one of LEMA's one-line messages."""


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


class UsageError(Exception):
    """The command line itself is wrong (a missing or contradictory option): exit status 2."""
