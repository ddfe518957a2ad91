"""bench/provenance.py names the source a benchmark ran: the commit, and the files' own tree when they differ."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import provenance  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSECC_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "kernel.py").write_text("A = 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_a_clean_checkout_is_named_by_its_commit(repo):
    (repo / "run.log").write_text("ignored files do not count\n")
    assert provenance.source_version(str(repo)) == _git(repo, "rev-parse", "--short", "HEAD")


def test_changed_files_add_the_tree_of_the_commit_that_holds_them(repo):
    first = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "kernel.py").write_text("A = 2\n")
    (repo / "new.py").write_text("B = 1\n")
    index_before = (repo / ".git" / "index").read_bytes()
    version = provenance.source_version(str(repo))
    assert (repo / ".git" / "index").read_bytes() == index_before   # the repository's index is untouched
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "second")
    assert version == f"{first} + tree {_git(repo, 'rev-parse', 'HEAD^{tree}')[:12]}"
    assert provenance.source_version(str(repo)) == _git(repo, "rev-parse", "--short", "HEAD")


def test_no_git_state_reads_as_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSECC_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.source_version(str(tmp_path)) == "?"
    monkeypatch.setenv("SPARSECC_COMMIT", "abc1234")
    assert provenance.source_version(str(tmp_path)) == "abc1234"
