"""Spec files that are not regular, unreadable, huge or pathological, and saving: always a SpecError, never a hang.

Split from test_spec_load.py (loading, querying and the shape of SpecError messages), whose example spec and
``write`` helper these tests share.
"""

from __future__ import annotations

import pytest

from sparsecc.spec import SpecError, load_spec
from tests.spec.test_spec_load import EXAMPLE_DICT, write


# ---------------------------------------------------------------------------------------
# Files that are not regular, unreadable, huge or pathological: always a SpecError, never a hang
# ---------------------------------------------------------------------------------------

def _load_in_thread(path, timeout=20.0):
    """load_spec(path) in a daemon thread: returns what it raised, or fails the test if it blocks."""
    import threading

    result = {}

    def run():
        try:
            load_spec(path)
        except BaseException as exc:  # noqa: BLE001 - the point is to see what escapes
            result["exc"] = exc
        else:
            result["loaded"] = True

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    blocked = thread.is_alive()
    return blocked, result


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    blocked, result = _load_in_thread(fifo)
    if blocked:  # release the reader before failing, so the thread does not outlive the test
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not blocked, "load_spec blocked on a FIFO"
    err = result.get("exc")
    assert isinstance(err, SpecError), result
    assert err.file == str(fifo) and "named pipe" in str(err) and str(fifo) in str(err)


def test_devices_and_sockets_are_refused(tmp_path):
    import os
    import socket

    null = tmp_path / "null.toml"
    null.symlink_to(os.devnull)
    with pytest.raises(SpecError, match=r"null\.toml: is a device, not a regular file"):
        load_spec(null)
    if os.path.exists("/dev/zero"):  # endless: reading it whole would never finish
        zero = tmp_path / "zero.json"
        zero.symlink_to("/dev/zero")
        blocked, result = _load_in_thread(zero)
        assert not blocked and isinstance(result.get("exc"), SpecError), result
    if hasattr(socket, "AF_UNIX") and len(str(tmp_path / "s.toml")) < 100:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(tmp_path / "s.toml"))
            with pytest.raises(SpecError, match=r"s\.toml: is a socket"):
                load_spec(tmp_path / "s.toml")
        finally:
            sock.close()


def test_unreadable_files_raise_spec_error(tmp_path, monkeypatch):
    import os

    path = write(tmp_path, "locked.toml", "version = 1\n")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything: simulate the refusal below
        path.chmod(0)
        try:
            with pytest.raises(SpecError, match=r"locked\.toml: cannot be read: Permission denied"):
                load_spec(path)
        finally:
            path.chmod(0o600)
    from sparsecc.spec import loader

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(loader.os, "open", refuse)
    with pytest.raises(SpecError, match=r"locked\.toml: cannot be read: Permission denied") as info:
        load_spec(path)
    assert info.value.file == str(path)
    monkeypatch.undo()

    def fail_read(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(loader.os, "read", fail_read)
    with pytest.raises(SpecError, match=r"locked\.toml: cannot be read: Input/output error"):
        load_spec(path)


@pytest.mark.parametrize("name", ["a" * 5000 + ".toml", "nul\0byte.toml", "loop.json", "file.toml/x.toml"])
def test_unusable_paths_raise_spec_error(tmp_path, name):
    write(tmp_path, "file.toml", "version = 1\n")
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    with pytest.raises(SpecError) as info:
        load_spec(str(tmp_path / name))
    assert info.value.file == str(tmp_path / name)
    assert "cannot be read" in str(info.value) or "does not exist" in str(info.value)


def test_a_huge_file_is_refused_before_it_is_read_whole(tmp_path):
    from sparsecc.spec.files import MAX_SPEC_BYTES

    path = tmp_path / "huge.toml"
    with open(path, "wb") as f:
        f.write(b"version = 1\n")
        f.truncate(MAX_SPEC_BYTES + 1)   # sparse: costs no disk
    with pytest.raises(SpecError, match=r"huge\.toml: is larger than"):
        load_spec(path)


@pytest.mark.parametrize("make", [
    lambda d: {"version": 1, "attention": [{"form": "streaming", "sink": d, "window": 1}]},
    lambda d: {"version": 1, "attention": [{"form": "dense", "heads": [d]}]},
    lambda d: {"version": 1, "ffn": [{"form": "activation_threshold", "threshold": {"input": d}}]},
    lambda d: {"version": 1, "meta": {"x": d}},
    lambda d: {"version": 1, "colour": d},
], ids=["sink", "heads", "threshold", "meta", "unknown-key"])
@pytest.mark.parametrize("depth", [40, 990, 5000, 100_000])
def test_deeply_nested_values_raise_spec_error(make, depth):
    """Regression: a nested value in a rule escaped as RecursionError (from the form's repr)."""
    nested = 1
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(SpecError) as info:
        load_spec(make(nested))
    assert info.value.file == "<dict>"
    str(info.value).encode("utf-8")


def test_a_mapping_that_contains_itself_raises_spec_error():
    data = {"version": 1, "meta": {}}
    data["meta"]["self"] = data["meta"]
    with pytest.raises(SpecError, match="levels of nesting"):
        load_spec(data)


@pytest.mark.parametrize("suffix, text", [
    (".toml", "version = 1\nx = " + "[" * 100_000 + "]" * 100_000 + "\n"),
    (".toml", "version = 1\n[meta]\nx = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"),
    (".json", '{"version": 1, "meta": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"),
    (".json", '{"version": 1, "attention": [{"form": "streaming", "window": 1, "sink": '
     + "[" * 990 + "]" * 990 + "}]}"),
])
def test_deeply_nested_files_raise_spec_error(tmp_path, suffix, text):
    path = write(tmp_path, "deep" + suffix, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.file == str(path)


@pytest.mark.parametrize("text, needle", [
    ('{"version": 1, "\\ud800": 1}', r"'\ud800' = 1 is not an allowed key"),
    ('{"version": 1, "attention": [{"form": "dense", "\\udfff": 1}]}', r"attention[0].'\udfff' = 1"),
    ('{"version": 1, "attention": [{"form": "dense", "a\\nb": 1}]}', r"attention[0].'a\nb' = 1"),
])
def test_messages_always_print_as_utf8(tmp_path, text, needle):
    """Lone surrogates (valid JSON escapes) and control characters in keys are shown escaped."""
    path = write(tmp_path, "odd.json", text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    message.encode("utf-8")
    assert needle in message


def test_a_file_name_that_is_not_utf8_prints(tmp_path):
    import os

    if os.fsencode("\udcff") != b"\xff":
        pytest.skip("file names are not bytes here")
    name = os.path.join(os.fsencode(tmp_path), b"\xff.toml")
    with open(name, "wb") as f:
        f.write(b"version = 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(os.fsdecode(name))
    assert "\\udcff.toml:1: version = 2" in str(info.value)
    str(info.value).encode("utf-8")


# ---------------------------------------------------------------------------------------
# Saving: regular files only, never blocking
# ---------------------------------------------------------------------------------------

def _save_in_thread(spec, path, timeout=20.0):
    import threading

    result = {}

    def run():
        try:
            spec.save(path)
        except BaseException as exc:  # noqa: BLE001 - the point is to see what escapes
            result["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread.is_alive(), result


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_saving_to_a_fifo_is_refused_without_blocking(tmp_path):
    """Regression: Spec.save opened a FIFO for writing and blocked until a reader came."""
    import os

    fifo = tmp_path / "out.toml"
    os.mkfifo(fifo)
    blocked, result = _save_in_thread(load_spec(EXAMPLE_DICT), fifo)
    if blocked:  # let the writer through before failing, so the thread does not outlive the test
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not blocked, "Spec.save blocked on a FIFO"
    err = result.get("exc")
    assert isinstance(err, SpecError) and err.file == str(fifo) and "named pipe" in str(err), result


def test_saving_refuses_devices_and_directories_and_replaces_files(tmp_path):
    import os

    spec = load_spec(EXAMPLE_DICT)
    null = tmp_path / "null.json"
    null.symlink_to(os.devnull)
    with pytest.raises(SpecError, match=r"null\.json: is a device, not a regular file"):
        spec.save(null)
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(SpecError, match=r"d\.toml: is a directory"):
        spec.save(tmp_path / "d.toml")
    with pytest.raises(SpecError, match=r"cannot be written"):
        spec.save(tmp_path / "missing" / "s.toml")
    target = write(tmp_path, "s.toml", "x" * 100_000)   # longer than the spec: must be cut, not overwritten
    spec.save(target)
    assert load_spec(target) == spec
