"""The library's own errors: what a person can fix (a bad input, an output in use, a file that
changed). The command line prints them as one line; a traceback is for bugs only."""


class CurateError(Exception):
    """A failure the user can act on; the message names the file, the row or shard, and what to do."""
