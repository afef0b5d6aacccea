"""Errors that reach a user: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, bad config, missing binary); shown without a traceback."""
