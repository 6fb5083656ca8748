"""The base of errors that are the user's to fix (bad data, an unreachable tracking store),
and how a bad value is shown in their one-line messages.

Stages print them as one line without a traceback (`ferflow.core.stage.run`); defining
the base here lets core catch them without importing the subpackages that raise them.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_MESSAGE_VALUE = 200  # characters of a bad value shown in a message

_REPR = reprlib.Repr()  # bounded repr: nested lists of an alias bomb would print megabytes
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 8, 8
_REPR.maxstring = _REPR.maxother = MAX_MESSAGE_VALUE


def short_repr(value: Any) -> str:
    """repr of a bad value, cut to MAX_MESSAGE_VALUE characters (a message stays one line)."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_MESSAGE_VALUE else text[:MAX_MESSAGE_VALUE] + "..."


class UserError(RuntimeError):
    """Something the user must fix; its message names the file, key or setting and what was expected."""
