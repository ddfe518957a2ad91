"""The sparsecc spec: which sparse form to apply where, as a validated, frozen :class:`Spec`.

Load one with :func:`load_spec` from a ``.toml`` or ``.json`` file, a mapping, or an existing
Spec. Every problem is a :class:`SpecError` naming the file, key path, line, value and
what is allowed. The format is described in ``docs/spec.md``.
"""

from .errors import SpecError
from .loader import load_spec
from .registry import KINDS, POLICIES
from .schema import Defaults, Rule, Spec

__all__ = ["Spec", "Rule", "Defaults", "SpecError", "load_spec", "KINDS", "POLICIES"]
