import os

import pytest

from sdlab.atomic import atomic_write


def test_the_file_gets_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(mask)
    assert path.read_bytes() == b"x"
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        open(tmp, "wb").write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
