"""Property-based test of `sdlab generate`'s options on the default model: any mix of good and bad
values ends in an image, or in exit 1 with one `sdlab: error:` line (argparse's usage errors: exit 2)
— never a traceback, and never a file from a run that failed."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdlab.cli import main
from tests.hostile import count

NUMBERS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-10, 10).map(float)
OPTIONS = st.fixed_dictionaries({}, optional={
    "--steps": st.integers(-2, 3),
    "--width": st.sampled_from([-8, 0, 7, 8, 32, 33, 64, 96]),
    "--height": st.sampled_from([-8, 0, 8, 32, 64, 100]),
    "--guidance": NUMBERS,
    "--sampler": st.sampled_from(["euler", "Euler a", "DPM++ 2M Karras", "ddim", "nonsense", "", "lms"]),
    "--schedule": st.sampled_from(["default", "karras", "exponential", "weird"]),
    "--seed": st.integers(-5, 2**33),
    "--batch": st.integers(-1, 2),
    "--clip-skip": st.integers(-1, 6),
    "--eta": NUMBERS,
    "--cfg-end": NUMBERS,
    "--token-merging": NUMBERS,
    "--guidance-rescale": NUMBERS,
    "--negative": st.text(max_size=20),
})


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, default_model_path):
    return tmp_path_factory.mktemp("cli-properties")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(options=OPTIONS, prompt=st.text(max_size=40))
def test_generate_with_any_options(out_dir, capsys, options, prompt):
    count("property: sdlab generate option sets")
    out = out_dir / f"case-{len(list(out_dir.iterdir()))}.png"
    argv = ["generate", prompt, "--out", str(out), "--steps", "1"]
    for flag, value in options.items():
        argv += [flag, str(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value of the wrong type, with its usage line
        code = e.code
        assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    written = [out] if out.exists() else sorted(out.parent.glob(f"{out.stem}-*.png"))  # a batch: out-0.png, …
    if code == 0:
        assert written
        for path in written:
            with Image.open(path) as im:
                im.verify()
    else:
        assert not written
        if code == 1:
            assert err.count("sdlab: error:") == 1, err
