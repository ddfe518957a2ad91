"""``SpecError``: the one exception the spec loader raises, with the file, key path, line and value.

Every problem with a spec, from a missing file to a negative window, surfaces as a
``SpecError`` whose message reads like a compiler diagnostic::

    llama.toml:14: attention[2].window = -3 is not allowed; expected an integer >= 1

The parts are also kept as attributes so that tools (the CLI, the report) can point at
the exact place without parsing the message.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

# Long values (a 10 kB string, a huge table) would drown the message; cut them here.
_MAX_SHOWN_CHARS = 80

# Marks "no value was given" apart from a value that is itself None.
_UNSET: Any = object()

KeyPath = Tuple[Union[str, int], ...]


def printable(text: str) -> str:
    """``text`` with every character that would not print escaped (a lone surrogate from JSON or a
    non-UTF-8 file name, a control character), so that a message always prints on a UTF-8 terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def format_key(path: KeyPath) -> Optional[str]:
    """Render a key path tuple such as ``("attention", 2, "window")`` as ``attention[2].window``.

    A key that would not print (a lone surrogate from JSON, a control character) is shown as its repr.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = str(part)
            if printable(part) != part:
                part = repr(part)
            text += f".{part}" if text else part
    return text or None


def show_value(value: Any) -> str:
    """A short, safe ``repr`` of a user value for an error message."""
    try:
        text = repr(value)
    except ValueError:
        # Python refuses to print ints of more than ~4300 digits; say what it is instead.
        return f"<integer of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable value>"
    except RecursionError:  # a table nested thousands deep
        return f"<deeply nested {type(value).__name__}>"
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


class SpecError(ValueError):
    """A spec that cannot be loaded, saved or built, with everything known about where and why.

    Attributes:
        file: the spec's path, ``"<dict>"`` for a mapping, ``"<Spec>"`` for objects built in
            Python, or None.
        key: the key path, e.g. ``"attention[2].window"``, or None.
        line: the 1-based line in the file, or None when unknown (mappings, most JSON values).
        value: the offending value, or None.
        allowed: a description of what would have been accepted, or None.
        problem: the verb phrase, e.g. ``"is not allowed"`` or ``"is missing"``.

    ``str(err)`` joins them: ``"<file>:<line>: <key> = <value> <problem>; expected <allowed>"``,
    leaving out the parts that are unknown.
    """

    def __init__(self, problem: str = "is not allowed", *, file: Optional[str] = None,
                 key: Optional[str] = None, line: Optional[int] = None, value: Any = _UNSET,
                 allowed: Optional[str] = None):
        self.problem = problem
        self.file = file
        self.key = key
        self.line = line
        self.value = None if value is _UNSET else value
        self.allowed = allowed
        self._has_value = value is not _UNSET
        # The value is shown only next to its key: without a key the problem text says it all.
        self._show_value = self._has_value and key is not None
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            file = printable(str(self.file))
            where = file if self.line is None else f"{file}:{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        subject = self.key or ""
        if self._show_value:
            subject += f" = {show_value(self.value)}"
        text = f"{subject} {self.problem}" if subject else self.problem
        if self.allowed:
            text += f"; expected {self.allowed}"
        return f"{where}: {text}" if where else text

    def reworded(self, words, key: bool = True) -> "SpecError":
        """The same error with ``words(text)`` applied to its problem, allowed values and (when ``key``) its key,
        never to its file or value: e.g. to name a command's flags instead of Python keywords."""
        value = {"value": self.value} if self._has_value else {}
        return SpecError(words(self.problem), file=self.file, key=self.key and (words(self.key) if key else self.key),
                         line=self.line, allowed=self.allowed and words(self.allowed), **value)
