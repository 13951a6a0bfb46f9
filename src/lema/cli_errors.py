"""Errors the command line maps to exit statuses (see lema/cli.py)."""


class UsageError(Exception):
    """The command line itself is wrong (a missing or contradictory option): exit status 2."""
