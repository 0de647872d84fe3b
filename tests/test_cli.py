"""The editing commands: `sdlab img2img`, `sdlab inpaint`, `sdlab outpaint` write images with their settings,
and bad input ends in one line on stderr, a non-zero exit and no file."""

from __future__ import annotations

import pytest
from PIL import Image

from sdlab.cli import main
from sdlab.config import preset
from sdlab.pipelines.metadata import parse_parameters
from tests.reference import diffusers_pipeline, smooth_picture


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    diffusers_pipeline(preset("tiny-sd1"), seed=90).save_pretrained(root / "model")
    smooth_picture(32, seed=1).save(root / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(root / "mask.png")
    Image.new("L", (16, 16)).save(root / "small-mask.png")
    return root


def _parameters(path) -> dict:
    with Image.open(path) as im:
        return parse_parameters(im.info["parameters"])[2]


def test_img2img_inpaint_outpaint_write_their_settings(files, tmp_path):
    model = ["--model", str(files / "model"), "--steps", "3", "--seed", "4"]
    assert main(["img2img", str(files / "in.png"), "a red circle", "--strength", "0.5", *model,
                 "--out", str(tmp_path / "a.png")]) == 0
    assert _parameters(tmp_path / "a.png")["Denoising strength"] == "0.5"
    assert main(["inpaint", str(files / "in.png"), str(files / "mask.png"), "a red circle", "--fill", "noise",
                 "--mask-blur", "2", "--only-masked", "--padding", "8", *model, "--out", str(tmp_path / "b.png")]) == 0
    pairs = _parameters(tmp_path / "b.png")
    assert (pairs["Masked content"], pairs["Mask blur"], pairs["Inpaint area"]) == ("latent noise", "2", "Only masked")
    assert main(["outpaint", str(files / "in.png"), "a red circle", "--extend", "8,0,8,0", *model,
                 "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (48, 32)


@pytest.mark.parametrize("argv, message", [
    (["img2img", "{in}", "p", "--strength", "1.5"], "strength must be in [0, 1], got 1.5"),
    (["img2img", "{missing}", "p"], "no such file"),
    (["inpaint", "{in}", "{small}", "p"], "mask is 16x16 but the image is 32x32"),
    (["img2img", "{in}", "p", "--width", "31"], "width 31 must be a positive multiple"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, argv, message):
    names = {"in": files / "in.png", "small": files / "small-mask.png", "missing": files / "nope.png"}
    out = tmp_path / "out.png"
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    assert main([*argv, "--model", str(files / "model"), "--steps", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_extend_is_a_usage_error(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["outpaint", str(files / "in.png"), "p", "--extend", "8,8"])
    assert e.value.code == 2 and "LEFT,TOP,RIGHT,BOTTOM" in capsys.readouterr().err
