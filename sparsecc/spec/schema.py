"""The v1 spec as frozen dataclasses: :class:`Defaults`, :class:`Rule` and :class:`Spec`.

Objects are validated on construction (whether the loader or Python code builds them), so
a ``Spec`` in hand is always a valid one. The loader (:mod:`sparsecc.spec.loader`) checks
raw TOML/JSON/dict input first, to report errors with the file, key path and line; the
checks here are the same ones, reported with the file ``"<Spec>"``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from sparsecc.forms import INT64_MAX, INT64_MIN, Form

from .errors import KeyPath, SpecError, format_key
from .registry import FORMS, KINDS, PHASES, POLICIES, entry_for

SPEC_VERSION = 1
DEFAULT_POLICY = "auto"
# Apply a form only when it is predicted at least 5% faster than dense: below that, the
# cost model's error is larger than the gain, and a dense site is the safe choice.
DEFAULT_MARGIN = 1.05
# TOML integers are signed 64-bit; holding every integer to that (INT64_MIN..INT64_MAX, shared with
# sparsecc.forms) keeps TOML, JSON and mappings alike.
# Free-form [meta] nesting beyond this is surely a mistake, and it keeps recursion shallow.
MAX_META_DEPTH = 32
# The file name errors carry for objects built in Python rather than loaded from a file.
IN_CODE = "<Spec>"

ALLOWED_GLOB = "a non-empty glob with no whitespace and balanced [...] (e.g. \"model.layers.*.mlp\")"
ALLOWED_HEADS = "a non-empty list of distinct integers >= 0"
ALLOWED_POLICY = "one of " + ", ".join(POLICIES)
ALLOWED_PHASE = "one of " + ", ".join(PHASES)
ALLOWED_MARGIN = "a finite number > 0"
ALLOWED_INT64 = "an integer within the 64-bit range"
ALLOWED_META = "a string, finite number, bool, array or table"


# ---------------------------------------------------------------------------------------
# Checks shared by the loader and the constructors. Each returns None when the value is
# fine, else the text for "expected ..." in the error.
# ---------------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    """A real integer (bools are not integers here) within the 64-bit range."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def is_finite_number(value: Any) -> bool:
    """An int or float, not a bool, neither NaN nor infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to be a float
        return False


def is_text(value: Any) -> bool:
    """A str that can be written as UTF-8 (no lone surrogates, which JSON input can smuggle in)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _brackets_balanced(glob: str) -> bool:
    """True when every ``[`` closes the way :mod:`fnmatch` reads it and no ``]`` stands alone."""
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "]":
            return False
        if char == "[":
            j = i + 1
            # fnmatch: a leading "!" negates, and a "]" right after "[" or "[!" is a literal.
            if j < len(glob) and glob[j] == "!":
                j += 1
            if j < len(glob) and glob[j] == "]":
                j += 1
            close = glob.find("]", j)
            if close < 0:
                return False
            i = close + 1
        else:
            i += 1
    return True


def check_glob(value: Any) -> Optional[str]:
    """Validate a ``modules`` glob."""
    ok = (is_text(value) and value != "" and not any(c.isspace() for c in value)
          and _brackets_balanced(value))
    return None if ok else ALLOWED_GLOB


def check_heads(value: Any) -> Optional[str]:
    """Validate ``heads`` (a list or tuple)."""
    ok = (isinstance(value, (list, tuple)) and len(value) > 0
          and all(is_int(h) and h >= 0 for h in value) and len(set(value)) == len(value))
    return None if ok else ALLOWED_HEADS


def check_phase(value: Any) -> Optional[str]:
    """Validate an attention rule's phase string."""
    return None if isinstance(value, str) and value in PHASES else ALLOWED_PHASE


def check_policy(value: Any) -> Optional[str]:
    """Validate a policy string."""
    return None if isinstance(value, str) and value in POLICIES else ALLOWED_POLICY


def out_of_int64(value: Any) -> bool:
    """An integer (not a bool) outside the signed 64-bit range: refused wherever it appears in a spec."""
    return isinstance(value, int) and not isinstance(value, bool) and not is_int(value)


def check_margin(value: Any) -> Optional[str]:
    """Validate ``defaults.margin``."""
    if out_of_int64(value):
        return ALLOWED_INT64
    return None if is_finite_number(value) and value > 0 else ALLOWED_MARGIN


def find_meta_problem(value: Any, path: KeyPath, depth: int = 0) -> Optional[Tuple[KeyPath, Any, str]]:
    """The first bad entry of free-form ``meta`` as (path, value, allowed), or None when all is fine."""
    if depth > MAX_META_DEPTH:
        return path, value, f"at most {MAX_META_DEPTH} levels of nesting"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not is_text(key):
                return path, key, "string keys"
            found = find_meta_problem(item, path + (key,), depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_meta_problem(item, path + (i,), depth + 1)
            if found:
                return found
        return None
    if isinstance(value, bool) or is_text(value) or is_finite_number(value):
        if out_of_int64(value):
            return path, value, ALLOWED_INT64
        return None
    return path, value, ALLOWED_META


# ---------------------------------------------------------------------------------------
# Frozen free-form data
# ---------------------------------------------------------------------------------------

class FrozenDict(Mapping):
    """A read-only, hashable mapping (``[meta]`` is kept in one so that a Spec stays hashable)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping = ()):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name, value):
        raise AttributeError("FrozenDict is read-only")

    def __reduce__(self):
        return FrozenDict, (self._data,)

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


def freeze(value: Any) -> Any:
    """Deep-copy plain data into immutable containers (tables -> FrozenDict, arrays -> tuple)."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of :func:`freeze`: plain dicts and lists, ready for TOML or JSON."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# The dataclasses
# ---------------------------------------------------------------------------------------

def _fail(key: Optional[str], value: Any, allowed: str) -> SpecError:
    return SpecError(file=IN_CODE, key=key, value=value, allowed=allowed)


@dataclass(frozen=True)
class Defaults:
    """Spec-wide settings: the default ``policy`` and the cost model's ``margin``.

    ``policy``: "auto" lets the cost model decide per site, "force" always applies the
    rule's form, "off" never does. ``margin``: under "auto", a form is applied when its
    predicted time is at most ``dense time / margin``.
    """

    policy: str = DEFAULT_POLICY
    margin: float = DEFAULT_MARGIN

    def __post_init__(self):
        if check_policy(self.policy):
            raise _fail("defaults.policy", self.policy, ALLOWED_POLICY)
        allowed = check_margin(self.margin)
        if allowed:
            raise _fail("defaults.margin", self.margin, allowed)
        # Keep the margin a float whatever numeric type it came in as (margin = 2 in TOML).
        object.__setattr__(self, "margin", float(self.margin))


_KIND_ORDER = {"attention": 0, "ffn": 1, "linear": 2}


def rule_sort_key(key: str) -> Tuple[int, str, int, str]:
    """Order rule keys by kind, then index as a number: ``attention[9]`` before ``attention[10]``."""
    match = re.fullmatch(r"([A-Za-z_]+)\[(\d+)\]", key)
    if match is None:
        return (len(_KIND_ORDER), key, 0, key)   # not a rule key: after the rules, by text
    kind, index = match.group(1), int(match.group(2))
    return (_KIND_ORDER.get(kind, len(_KIND_ORDER)), kind, index, key)


@dataclass(frozen=True)
class Rule:
    """One ``[[attention]]``, ``[[ffn]]`` or ``[[linear]]`` entry: where (``modules``, ``heads``) and what (``form``).

    ``heads`` is kept sorted (it is a set of heads); ``policy`` None means "the spec's default".
    ``phase`` (attention only): "prefill" applies the rule where a site has more than one
    query, "decode" where it has one, "both" everywhere.
    """

    kind: str
    index: int
    form: Form
    modules: str = "*"
    heads: Optional[Tuple[int, ...]] = None
    policy: Optional[str] = None
    phase: str = "both"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise _fail("kind", self.kind, "one of " + ", ".join(KINDS))
        if not (is_int(self.index) and self.index >= 0):
            raise _fail(f"{self.kind}.index", self.index, "an integer >= 0")
        try:
            entry_for(self.kind, self.form)
        except (KeyError, AttributeError, TypeError):
            raise _fail(f"{self.key}.form", self.form,
                        f"a {self.kind} form: one of " + ", ".join(FORMS[self.kind])) from None
        if check_glob(self.modules):
            raise _fail(f"{self.key}.modules", self.modules, ALLOWED_GLOB)
        if self.heads is not None:
            if self.kind != "attention":
                raise _fail(f"{self.key}.heads", self.heads, "None: only attention rules select heads")
            if check_heads(self.heads):
                raise _fail(f"{self.key}.heads", self.heads, ALLOWED_HEADS)
            object.__setattr__(self, "heads", tuple(sorted(self.heads)))
        if self.policy is not None and check_policy(self.policy):
            raise _fail(f"{self.key}.policy", self.policy, ALLOWED_POLICY)
        if check_phase(self.phase):
            raise _fail(f"{self.key}.phase", self.phase, ALLOWED_PHASE)
        if self.phase != "both" and self.kind != "attention":
            raise _fail(f"{self.key}.phase", self.phase, "'both': only attention rules select a phase")

    @property
    def key(self) -> str:
        """The rule's key path, e.g. ``"attention[2]"``."""
        return f"{self.kind}[{self.index}]"

    def matches(self, module_path: str) -> bool:
        """True when the site's module path matches ``modules`` (case-sensitive fnmatch; ``*`` crosses dots)."""
        return fnmatch.fnmatchcase(module_path, self.modules)

    def covers_head(self, head: Optional[int]) -> bool:
        """True when the rule applies to ``head`` (None: the site as a whole, i.e. only rules without ``heads``)."""
        if self.heads is None:
            return True
        return head is not None and head in self.heads

    def applies_at(self, seq_q) -> bool:
        """True when the rule's phase covers a site with ``seq_q`` queries (an int, or symbolic: more than one)."""
        if self.phase == "both":
            return True
        decode = isinstance(seq_q, int) and seq_q == 1
        return decode == (self.phase == "decode")

    def describe(self, policy: Optional[str] = None) -> str:
        """One line: key, modules, heads (attention), form, policy (``policy`` replaces an unset one)."""
        parts = [self.key, self.modules]
        if self.kind == "attention":
            parts.append("heads=" + ("all" if self.heads is None else ",".join(map(str, self.heads))))
            if self.phase != "both":
                parts.append(f"phase={self.phase}")
        parts.append(str(self.form))
        parts.append(f"policy={self.policy or policy or 'default'}")
        return "  ".join(parts)

    def __str__(self) -> str:
        return self.describe()


def _empty_meta() -> FrozenDict:
    return FrozenDict()


@dataclass(frozen=True)
class Spec:
    """A loaded, validated v1 spec: defaults plus ordered rules per site kind, and free-form ``meta``.

    Equality and hashing ignore ``source`` (where it was loaded from). Build one with
    :func:`sparsecc.spec.load_spec`, or directly from :class:`Rule` objects.
    """

    version: int = SPEC_VERSION
    defaults: Defaults = field(default_factory=Defaults)
    attention: Tuple[Rule, ...] = ()
    ffn: Tuple[Rule, ...] = ()
    linear: Tuple[Rule, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=_empty_meta)
    source: Optional[str] = field(default=None, compare=False)

    def __post_init__(self):
        if not (is_int(self.version) and self.version == SPEC_VERSION):
            raise _fail("version", self.version, str(SPEC_VERSION))
        if not isinstance(self.defaults, Defaults):
            raise _fail("defaults", self.defaults, "a sparsecc.spec.Defaults")
        for kind in KINDS:
            rules = getattr(self, kind)
            if not isinstance(rules, (list, tuple)):
                raise _fail(kind, rules, "a sequence of sparsecc.spec.Rule")
            rules = tuple(rules)
            for i, rule in enumerate(rules):
                if not isinstance(rule, Rule) or rule.kind != kind or rule.index != i:
                    raise _fail(f"{kind}[{i}]", rule, f"a Rule with kind={kind!r} and index={i} "
                                "(Spec.with_rules re-indexes)")
            object.__setattr__(self, kind, rules)
        if not isinstance(self.meta, Mapping):
            raise _fail("meta", self.meta, "a table")
        problem = find_meta_problem(self.meta, ("meta",))
        if problem:
            path, value, allowed = problem
            raise _fail(format_key(path), value, allowed)
        object.__setattr__(self, "meta", freeze(self.meta))
        if self.source is not None:
            object.__setattr__(self, "source", str(self.source))

    def rules(self, kind: str) -> Tuple[Rule, ...]:
        """All rules of one kind, in spec order."""
        if kind not in KINDS:
            raise _fail("kind", kind, "one of " + ", ".join(KINDS))
        return getattr(self, kind)

    def matching(self, kind: str, module_path: str, seq_q: Any = None) -> List[Rule]:
        """The rules of ``kind`` whose ``modules`` match ``module_path``, in spec order (the last one wins).

        With ``seq_q`` (a site's query count: an int, or symbolic for more
        than one) only the rules whose ``phase`` covers that site: a rule of
        the other phase does not cover it at all (docs/spec.md). None: every
        phase.
        """
        return [rule for rule in self.rules(kind)
                if rule.matches(module_path) and (seq_q is None or rule.applies_at(seq_q))]

    def resolve(self, kind: str, module_path: str, head: Optional[int] = None, seq_q: Any = None) -> Optional[Rule]:
        """The rule that decides a site (or one head of an attention site): the last covering one, or None.

        ``head`` None counts only rules without ``heads``; ``seq_q`` as in
        ``matching`` (rules whose phase excludes the site do not count).
        """
        for rule in reversed(self.matching(kind, module_path, seq_q)):
            if rule.covers_head(head):
                return rule
        return None

    def policy_for(self, rule: Rule) -> str:
        """The rule's own policy, else the spec's default policy."""
        return rule.policy or self.defaults.policy

    def with_rules(self, kind: str, rules: Sequence[Rule]) -> "Spec":
        """A copy whose ``kind`` rules are ``rules``, re-indexed 0..n-1 in the given order."""
        self.rules(kind)  # validates kind
        reindexed = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise _fail(f"{kind}[{i}]", rule, "a sparsecc.spec.Rule")
            reindexed.append(replace(rule, index=i))
        return replace(self, **{kind: tuple(reindexed)})

    def to_dict(self) -> Dict[str, Any]:
        """The spec as plain v1 data (minimal: keys equal to their defaults are left out)."""
        from .writer import spec_to_dict  # the writer imports this module: import it late
        return spec_to_dict(self)

    def save(self, path) -> None:
        """Write the spec to ``path``: TOML for ``.toml``, JSON for ``.json`` (any other suffix is a SpecError)."""
        from .writer import save_spec
        save_spec(self, path)

    def __str__(self) -> str:
        head = f"sparsecc spec v{self.version}: policy={self.defaults.policy}, margin={self.defaults.margin:g}"
        if self.source:
            head += f", from {self.source}"
        lines = [head]
        for kind in KINDS:
            lines.extend(rule.describe(self.policy_for(rule)) for rule in self.rules(kind))
        if len(lines) == 1:
            lines.append("(no rules: every site stays dense)")
        return "\n".join(lines)
