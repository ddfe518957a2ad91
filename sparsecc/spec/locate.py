"""Finding the line of a key path in the raw text of a spec, for error messages.

``tomllib`` and ``json`` return plain data without positions. For TOML, :class:`TomlLocator`
scans the (already successfully parsed) text once, recording the line of every table
header and ``key =`` it sees, and numbering ``[[attention]]``-style headers so that
``("attention", 2, "window")`` finds the ``window =`` line inside the third
``[[attention]]``. For JSON, :func:`parse_json` records the span of every object, and
:class:`JsonLocator` looks for ``"key":`` inside the containing object's span.

Both are best effort: a path they cannot place gives the line of its closest known
parent, or None. They never raise, because a locating bug must not hide the real error.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from typing import Any, Dict, List, Optional, Tuple

from .errors import KeyPath

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def line_at(text: str, pos: int) -> int:
    """The 1-based line of character offset ``pos`` in ``text``."""
    return text.count("\n", 0, pos) + 1


class TomlLocator:
    """Maps key paths to 1-based line numbers in TOML text."""

    def __init__(self, text: str):
        self._lines: Dict[KeyPath, int] = {}
        try:
            self._scan(text)
        except Exception:  # best effort by design: keep whatever was recorded so far
            pass

    def line(self, path: KeyPath) -> Optional[int]:
        """The line of ``path``, else of its closest recorded parent, else None."""
        for n in range(len(path), 0, -1):
            found = self._lines.get(tuple(path[:n]))
            if found is not None:
                return found
        return None

    # -- scanning ---------------------------------------------------------------------

    def _scan(self, text: str) -> None:
        counts: Dict[KeyPath, int] = {}  # number of [[x]] headers seen per resolved path
        current: KeyPath = ()
        i, line, n = 0, 1, len(text)
        while i < n:
            char = text[i]
            if char == "\n":
                line += 1
                i += 1
            elif char in " \t\r":
                i += 1
            elif char == "#":
                i = self._end_of_line(text, i)
            elif char == "[":
                is_array = text.startswith("[[", i)
                parts, _ = _parse_key(text, i + (2 if is_array else 1))
                current = self._header_path(parts, is_array, counts)
                self._lines.setdefault(current, line)
                i = self._end_of_line(text, i)
            else:
                parts, j = _parse_key(text, i)
                if parts:
                    path = current + tuple(parts)
                    self._lines.setdefault(path, line)
                    eq = text.find("=", j)
                    i, line = _skip_value(text, (eq + 1) if eq >= 0 else n, line,
                                          lambda index, at, path=path: self._lines.setdefault(path + (index,), at))
                else:
                    i = self._end_of_line(text, i)

    @staticmethod
    def _end_of_line(text: str, i: int) -> int:
        end = text.find("\n", i)
        return len(text) if end < 0 else end

    @staticmethod
    def _header_path(parts: List[str], is_array: bool, counts: Dict[KeyPath, int]) -> KeyPath:
        """Resolve a header's dotted key, stepping into the latest element of any array of tables."""
        path: KeyPath = ()
        last = len(parts) - 1
        for k, part in enumerate(parts):
            path = path + (part,)
            if k == last and is_array:
                index = counts.get(path, 0)
                counts[path] = index + 1
                return path + (index,)
            if path in counts:
                path = path + (counts[path] - 1,)
        return path


def _parse_key(text: str, i: int) -> Tuple[List[str], int]:
    """Parse a (dotted, possibly quoted) key starting at ``i``; returns its parts and the end."""
    parts: List[str] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            end = i + 1
            while end < n and text[end] not in '"\n':
                end += 2 if text[end] == "\\" else 1
            try:
                parts.append(json.loads(text[i:end + 1]))
            except ValueError:  # a TOML-only escape (\U0001F600): the raw text is close enough
                parts.append(text[i + 1:end])
            i = end + 1
        elif text[i] == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            parts.append(text[i + 1:end])
            i = end + 1
        else:
            match = _BARE_KEY.match(text, i)
            if not match:
                break
            parts.append(match.group())
            i = match.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        break
    return parts, i


def _skip_value(text: str, i: int, line: int, on_element=None) -> Tuple[int, int]:
    """Skip a value that may span lines (arrays, multi-line strings); returns (position, line).

    ``on_element(index, line)`` is told where each element of a top-level array starts (an inline array of
    rules spread over lines: ``attention = [ {...}, {...} ]``), so errors in one rule point at its line.
    """
    n = len(text)
    depth = 0
    outer_array = False          # the value is an array; its elements sit at depth 1
    index, expecting = 0, False  # the next element's index, and whether one may start here
    while i < n:
        char = text[i]
        if expecting and depth == 1 and char not in " \t\r\n#,]":   # the next element of the array starts here
            if on_element is not None:
                on_element(index, line)
            expecting = False
        if char == "\n":
            line += 1
            i += 1
            if depth == 0:
                return i, line
        elif char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif char in "\"'":
            triple = char * 3
            if text.startswith(triple, i):
                end = text.find(triple, i + 3)
                while end > 0 and char == '"' and _escaped(text, end):
                    end = text.find(triple, end + 1)
                end = n if end < 0 else end + 3
                # TOML lets one or two quotes sit right before the closing delimiter.
                while end < n and text[end] == char:
                    end += 1
            else:
                end = i + 1
                while end < n and text[end] not in (char, "\n"):
                    end += 2 if (char == '"' and text[end] == "\\") else 1
                end = min(end + 1, n)
            line += text.count("\n", i, end)
            i = end
        elif char in "[{":
            if depth == 0 and char == "[":
                outer_array, expecting = True, True
            depth += 1
            i += 1
        elif char in "]}":
            depth = max(0, depth - 1)
            i += 1
        elif char == "," and depth == 1 and outer_array:
            index, expecting = index + 1, True
            i += 1
        else:
            i += 1
    return i, line


def _escaped(text: str, pos: int) -> bool:
    """True when the character at ``pos`` is preceded by an odd number of backslashes."""
    count = 0
    while pos - count - 1 >= 0 and text[pos - count - 1] == "\\":
        count += 1
    return count % 2 == 1


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------

class DuplicateKey(ValueError):
    """A JSON object names the same key twice (JSON parsers silently keep the last; specs refuse)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key
        self.pos: Optional[int] = None  # where the second spelling of the key is (else the object's start)


class _SpanDecoder(json.JSONDecoder):
    """A JSON decoder that records where every object starts and ends, keyed by ``id(obj)``."""

    def __init__(self):
        super().__init__(object_pairs_hook=self._pairs)
        self.spans: Dict[int, Tuple[int, int]] = {}
        self.parse_object = self._parse_object
        # The C scanner ignores parse_object; the pure-Python one calls it for every "{".
        self.scan_once = json.scanner.py_make_scanner(self)

    def _pairs(self, pairs):
        out: Dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DuplicateKey(key)
            out[key] = value
        return out

    def _parse_object(self, s_and_end, *args, **kwargs):
        start = s_and_end[1]
        try:
            obj, end = json.decoder.JSONObject(s_and_end, *args, **kwargs)
        except DuplicateKey as exc:
            # The innermost object that saw the duplicate fills in where the key is written again.
            if exc.pos is None:
                exc.pos = self._second_key(s_and_end[0], start, exc.key)
            raise
        self.spans[id(obj)] = (start - 1, end)
        return obj, end


    def _second_key(self, text: str, start: int, key: str) -> int:
        """Where ``key`` is written a second time as a key of the object starting at ``start`` (keys of the
        objects nested in it, already parsed, do not count); the object's start when it cannot be found."""
        nested = [span for span in self.spans.values() if span[0] >= start]
        seen = 0
        for match in re.finditer(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text[start:]):
            at = start + match.start()
            if any(lo <= at < hi for lo, hi in nested):
                continue
            seen += 1
            if seen == 2:
                return at
        return start - 1


def parse_json(text: str) -> Tuple[Any, "JsonLocator"]:
    """Parse JSON text; returns the data and a locator for it. Raises ValueError/RecursionError."""
    decoder = _SpanDecoder()
    data = decoder.decode(text)
    return data, JsonLocator(text, data, decoder.spans)


class JsonLocator:
    """Maps key paths to lines in JSON text (the line of ``"key":`` in the right object)."""

    def __init__(self, text: str, data: Any, spans: Dict[int, Tuple[int, int]]):
        self._text = text
        self._data = data  # kept alive so that the ids in spans stay valid
        self._spans = spans

    def line(self, path: KeyPath) -> Optional[int]:
        """The line of ``path`` (or of the deepest object on it), or None."""
        try:
            return self._line(path)
        except Exception:  # best effort by design, see the module docstring
            return None

    def _line(self, path: KeyPath) -> Optional[int]:
        node, best = self._data, None
        for part in path:
            if isinstance(node, dict) and id(node) in self._spans:
                start, end = self._spans[id(node)]
                best = line_at(self._text, start)
                if isinstance(part, str):
                    hit = re.compile(re.escape(json.dumps(part, ensure_ascii=False)) + r"\s*:")
                    match = hit.search(self._text, start, end)
                    if match is None:
                        ascii_hit = re.escape(json.dumps(part)) + r"\s*:"
                        match = re.compile(ascii_hit).search(self._text, start, end)
                    if match is not None:
                        best = line_at(self._text, match.start())
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        if isinstance(node, dict) and id(node) in self._spans and path and isinstance(path[-1], int):
            best = line_at(self._text, self._spans[id(node)][0])
        return best
