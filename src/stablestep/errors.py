"""Exceptions shared across subpackages, in a leaf module (it imports nothing).

:class:`UsageError` lives here rather than in :mod:`stablestep.cli` so that the sub-CLIs
(``stablestep.*.cli``) do not import the top-level CLI that imports them.
"""


class UsageError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, exit status 2."""
