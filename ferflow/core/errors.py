"""The base of errors that are the user's to fix (bad input, unreachable store): a stage
prints them as one line and exits 2, without a traceback."""


class UserError(RuntimeError):
    pass
