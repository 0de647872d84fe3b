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


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys, default_model_path):
    import errno

    from PIL import Image

    from sdlab.cli import main

    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):  # half a PNG, then the disk is full
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out" / "a.png"
    assert main(["generate", "a red circle", "--steps", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sdlab: error:") and "No space left on device" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert list((tmp_path / "out").iterdir()) == []  # neither the image nor a temporary file
