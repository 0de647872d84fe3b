"""Property-based test of the editing commands' options (`img2img`, `inpaint`, `outpaint`) on the default
model: any mix ends in an image or one `sdlab: error:` line (argparse: exit 2), never a traceback or a
file from a failed run. Inputs include images of odd sizes and modes, and masks of the wrong size."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdlab.cli import main
from tests.hostile import count

NUMBERS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-2, 3).map(float)


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("edit-properties")
    images = {
        "rgb": Image.new("RGB", (64, 48), (200, 40, 40)),
        "rgba": Image.new("RGBA", (40, 64), (20, 40, 200, 128)),
        "grey": Image.new("L", (64, 64), 128),
        "tiny": Image.new("RGB", (3, 3), (0, 0, 0)),
    }
    for name, image in images.items():
        image.save(root / f"{name}.png")
    Image.new("L", (64, 48), 255).save(root / "mask-64x48.png")
    Image.new("L", (10, 10), 255).save(root / "mask-10x10.png")
    (root / "not-an-image.png").write_bytes(b"hello")
    return root


IMAGES = st.sampled_from(["rgb.png", "rgba.png", "grey.png", "tiny.png", "not-an-image.png", "missing.png"])
MASKS = st.sampled_from(["mask-64x48.png", "mask-10x10.png", "rgb.png", "not-an-image.png"])
COMMON = {
    "--steps": st.integers(-1, 2).map(str),
    "--strength": NUMBERS,
    "--mask-blur": st.integers(-3, 8).map(str),
    "--padding": st.integers(-5, 40).map(str),
    "--fill": st.sampled_from(["original", "noise", "nothing", "fill", "weird"]),
    "--width": st.sampled_from(["-8", "0", "32", "64", "70"]),
    "--seed": st.integers(-3, 2**34).map(str),
}
EXTEND = st.sampled_from(["8,0,8,0", "0,0,0,0", "-8,0,0,0", "1,2,3", "a,b,c,d", "64,64,64,64"])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["img2img", "inpaint", "outpaint"]), image=IMAGES, mask=MASKS, extend=EXTEND,
       options=st.fixed_dictionaries({}, optional=COMMON), only_masked=st.booleans())
def test_edit_commands_with_any_options(files, capsys, command, image, mask, extend, options, only_masked):
    count("property: edit command option sets")
    out = files / "out" / f"{command}.png"
    argv = [command, str(files / image)] + ([str(files / mask)] if command == "inpaint" else []) + ["a red circle"]
    argv += ["--out", str(out)] + (["--extend", extend] if command == "outpaint" else [])
    argv += ["--only-masked"] if only_masked and command == "inpaint" else []
    for flag, value in options.items():
        if flag == "--fill" and command == "outpaint":
            continue  # outpaint's own --outpaint-fill
        argv += [flag, value if not isinstance(value, float) else (repr(value) if not math.isfinite(value) else str(value))]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
        assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    written = [out] if out.exists() else []
    if code == 0:
        assert written
        with Image.open(out) as im:
            im.verify()
        out.unlink()
    else:
        assert not written
        if code == 1:
            assert err.count("sdlab: error:") == 1, err
