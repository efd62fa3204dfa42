"""The one exception type that reaches the user as a one-line message.

Anything raised as `PeftlabError` is the user's to fix (a path, a column, a config value):
the CLI prints its message on one line and exits with status 2, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class PeftlabError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = 2


class Interrupted(PeftlabError):
    """The user stopped a run (Ctrl-C); the message says whether and how it can resume."""

    exit_code = 130
