"""Which source a benchmark ran, for the header of its results.

A checkout copied to another machine can carry git metadata older than its files, so the commit alone may name
the wrong source. :func:`source_version` adds the git tree id of the files as they are whenever they differ from
the commit's tree; ``git log --format='%h %T'`` then finds the commit that holds exactly those files.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(args: List[str], root: str, env: Optional[dict] = None) -> Tuple[bool, str]:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False, ""
    return res.returncode == 0, res.stdout.strip()


def working_tree_id(root: str = ROOT) -> str:
    """The git tree id of the files under ``root`` as they are (tracked and untracked files that git does not
    ignore), built in a scratch index so the repository's own index is untouched; "" without git."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        ok, _ = _git(["add", "-A", "."], root, env)
        if not ok:
            return ""
        ok, tree = _git(["write-tree"], root, env)
        return tree if ok else ""


def source_version(root: str = ROOT) -> str:
    """The short commit of ``root``; with ``+ tree <id>`` when the files differ from it; "?" without git.

    ``SPARSECC_COMMIT``, when set, is taken as given (a checkout with no git state at all).
    """
    given = os.environ.get("SPARSECC_COMMIT")
    if given:
        return given
    ok, head = _git(["rev-parse", "--short", "HEAD"], root)
    if not ok:
        return "?"
    _, head_tree = _git(["rev-parse", "HEAD^{tree}"], root)
    tree = working_tree_id(root)
    if tree and tree != head_tree:
        return f"{head} + tree {tree[:12]}"
    return head
