"""The base of errors that are the user's to fix (bad data, an unreachable tracking store).

Stages print them as one line without a traceback (`ferflow.core.stage.run`); defining
the base here lets core catch them without importing the subpackages that raise them.
"""


class UserError(RuntimeError):
    """Something the user must fix; its message names the file, key or setting and what was expected."""
