"""`sdlab train` on tiny-sd1: both stages lower their loss, the model loads and generates, resume is
bit-exact, caption dropout and the empty prompt match the pipelines, bad input is one line."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import sdlab
from sdlab.cli import main
from sdlab.config import preset
from sdlab.errors import SdlabError
from sdlab.models.vae import AutoencoderKL
from sdlab.prompts import encode_prompt
from sdlab.tokenizer import Tokenizer
from sdlab.train.diffusion import LatentDiffusion, drop_captions, new_networks
from sdlab.train.distributed import Dist
from sdlab.train.loop import LoopConfig, fit, load_checkpoint
from sdlab.train.settings import TrainSettings
from sdlab.train.sources import SampleStream, open_source
from sdlab.train.trainer import train
from sdlab.train.vae import VAELoss, VAEStage, load_vae
from tests.train.synthetic import write_folder

TINY = ["--preset", "tiny-sd1", "--vae-batch", "4", "--batch", "8", "--warmup", "3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On two shared cores one thread is steadier than OpenMP threads spinning against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data"), count=16)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One short CLI run through both stages; its folder."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", *TINY, "--data", str(data), "--out", str(out), "--vae-steps", "40", "--vae-lr", "1e-3",
            "--steps", "40", "--lr", "1e-3", "--save-every", "20", "--sample-every", "20", "--sample-steps", "2",
            "--sample-prompt", "a red disc", "--sample-prompt", "a blue square", "--dtype", "fp16"]
    assert main(argv) == 0
    return out


def losses(out, stage):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage]


def mean(xs):
    return sum(xs) / len(xs)


def test_both_stages_lower_the_loss(run):
    vae, diffusion = losses(run, "vae"), losses(run, "diffusion")
    assert len(vae) == len(diffusion) == 40
    assert mean(vae[-8:]) < 0.8 * mean(vae[:8])
    assert mean(diffusion[-8:]) < 0.9 * mean(diffusion[:8])


def test_run_folder_holds_vae_cache_samples_and_model(run):
    assert not (run / "vae-state.pt").exists()  # stage 1 is done: its checkpoint gave way to vae.safetensors
    names = {p.name for p in (run / "samples").iterdir()}
    assert names == {"vae-000020.png", "vae-000040.png", "step-000020.png", "step-000040.png"}
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_model_loads_and_generates_with_the_measured_scale(run):
    vae = load_vae(run / "vae.safetensors")
    scale = vae.cfg.scaling_factor
    assert scale != preset("tiny-sd1").vae.scaling_factor and 0.01 < scale < 100
    pipe = sdlab.load(run / "model.safetensors")
    assert pipe.config.vae.scaling_factor == scale and pipe.config.name == "tiny-sd1"
    (image,) = pipe.generate("a red disc", steps=3, seed=1)
    assert image.size == (32, 32)


def test_a_models_vae_can_be_reused(run):
    own, from_model = load_vae(run / "vae.safetensors"), load_vae(run / "model.safetensors")
    assert from_model.cfg == own.cfg
    for (name, a), b in zip(own.state_dict().items(), from_model.state_dict().values()):
        assert torch.allclose(a, b.float(), rtol=1e-3, atol=1e-4), name  # the model is stored in fp16


def test_scale_is_one_over_the_std_of_posterior_samples(run):
    vae = load_vae(run / "vae.safetensors")
    moments = torch.load(run / "latents.pt", weights_only=True)["moments"]  # what the scale was measured on
    mean, std = moments[:, :4], (0.5 * moments[:, 4:]).exp()
    samples = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert vae.cfg.scaling_factor == pytest.approx(1 / samples.std().item(), rel=0.05)


def test_resume_is_bit_exact(run, data, tmp_path):
    base = TrainSettings(
        out="", preset="tiny-sd1", data=(str(data),), vae=str(run / "vae.safetensors"), steps=6, batch=4,
        warmup=2, accumulate=2, save_every=3, sample_every=0,
    )
    straight = train(replace(base, out=str(tmp_path / "straight")))
    first = train(replace(base, out=str(tmp_path / "resumed"), stop_at=3))
    assert first.model is None and not first.finished and len(first.losses) == 3
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:  # a step done after the last checkpoint
        log.write(json.dumps({"stage": "diffusion", "step": 4, "loss": 9.0}) + "\n")
    second = train(replace(base, out=str(tmp_path / "resumed")), resume=True)
    assert len(second.losses) == 3 and second.losses == straight.losses[3:]
    assert [r["step"] for r in map(json.loads, (tmp_path / "resumed" / "log.jsonl").read_text().splitlines())] == [
        1, 2, 3, 4, 5, 6]
    a = load_checkpoint(tmp_path / "straight" / "diffusion-state.pt")
    b = load_checkpoint(tmp_path / "resumed" / "diffusion-state.pt")
    assert a["step"] == b["step"] == 6
    for key in ("module", "ema", "optimizer"):
        assert_equal(a[key], b[key], key)
    models = [safe_open(str(tmp_path / name / "model.safetensors"), "pt") for name in ("straight", "resumed")]
    assert models[0].metadata() == models[1].metadata()
    assert_equal({k: models[0].get_tensor(k) for k in models[0].keys()},
                 {k: models[1].get_tensor(k) for k in models[1].keys()}, "model.safetensors")


def assert_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_vae_stage_resumes_bit_exactly(data, tmp_path):
    dataset = open_source(str(data), 32)
    cfg = preset("tiny-sd1")

    def session(name, stop_at):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL(cfg.vae)
        stage = VAEStage(VAELoss(vae, 1e-4), dataset, SampleStream(len(dataset), 3), 4, 0, torch.device("cpu"), tmp_path)
        loop = LoopConfig(steps=4, batch=4, lr=1e-3, warmup=1, stop_at=stop_at)
        return fit(stage, loop, Dist(), torch.device("cpu"), tmp_path / f"{name}.pt", resume=True)

    straight = session("straight", None)
    session("resumed", 2)
    resumed = session("resumed", None)
    assert resumed.losses == straight.losses[2:]
    assert_equal(straight.trainer.module.state_dict(), resumed.trainer.module.state_dict(), "vae")


def test_caption_dropout_rate_and_empty_prompt_match_the_pipeline():
    generator = torch.Generator().manual_seed(0)
    rate = drop_captions(100_000, 0.1, generator).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.005)
    assert not drop_captions(1000, 0.0, generator).any() and drop_captions(1000, 1.0, generator).all()

    cfg = preset("tiny-sd1")
    model = LatentDiffusion(cfg, *new_networks(cfg, seed=0))
    tokenizer = Tokenizer(cfg.text[0].tokenizer)
    ids = [tokenizer(["a red disc", "a blue square"])]
    with torch.no_grad():
        context, _ = model.condition(ids, torch.tensor([True, False]))
        empty, _ = encode_prompt("", list(model.text_encoders), [tokenizer], cfg.text)  # a pipeline's negative ""
        caption, _ = encode_prompt("a blue square", list(model.text_encoders), [tokenizer], cfg.text)
    assert torch.equal(context[0], empty[0]) and torch.equal(context[1], caption[0])


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd2"])  # two text encoders + pooled y; v-prediction
def test_other_families_train_and_generate(data, tmp_path, name):
    settings = TrainSettings(
        out=str(tmp_path / name), preset=name, data=(str(data),), limit=8, vae_steps=1, vae_batch=4, steps=4,
        batch=4, warmup=1, sample_every=0,
    )
    result = train(settings)
    assert result.finished and len(result.losses) == 4
    assert result.config.prediction_type == preset(name).prediction_type
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN pixel would warn when cast to uint8
        (image,) = sdlab.load(result.model).generate("a red disc", steps=2, seed=0)
    assert image.size == (32, 32)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/no/such/folder"], "no such file or folder"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "tiny-sd1-inpainting"], "text-to-image models"),
        (["--size", "33"], "multiple of 2"),
        (["--cfg-dropout", "1.5"], "caption dropout must be in"),
        (["--steps", "0"], "steps must be at least 1"),
    ],
)
def test_bad_input_is_one_line(data, tmp_path, capsys, extra, message):
    argv = ["train", *TINY, "--data", str(data), "--out", str(tmp_path / "o"), "--vae-steps", "1", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlab: error:") and message in err and "\n" not in err


def test_cli_resume_needs_only_the_folder(run, data, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", *TINY, "--data", str(data), "--out", str(out), "--vae", str(run / "vae.safetensors"),
            "--steps", "3", "--stop-at", "2", "--sample-every", "0"]
    assert main(argv) == 0 and not (out / "model.safetensors").exists()
    assert "continue with: sdlab train --out" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0  # the stop was for one session only
    assert capsys.readouterr().out.strip() == str(out / "model.safetensors")


def test_resume_rules(run, data, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", str(data), "--out", str(run)]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == 1
    assert "lr: 0.001 -> 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])  # epsilon, v-prediction
def test_min_snr_weighting_weights_each_sample_by_its_timestep(name):
    cfg = preset(name)
    networks = new_networks(cfg, seed=0)
    plain, weighted = LatentDiffusion(cfg, *networks), LatentDiffusion(cfg, *networks, min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ids = [Tokenizer(spec.tokenizer)(["a red disc"] * 3) for spec in cfg.text]
    t, drop = torch.tensor([5, 400, 990]), torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        per_sample = torch.stack([plain(x0[i:i + 1], [k[i:i + 1] for k in ids], drop[:1], t[i:i + 1], noise[i:i + 1])
                                  for i in range(3)])  # (3,) plain MSE of each sample alone
        loss = weighted(x0, ids, drop, t, noise)
    ac = plain.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    expected_w = snr.clamp(max=5.0) / (snr + 1 if cfg.prediction_type == "v_prediction" else snr)
    assert torch.allclose(weighted.loss_weights(t).double(), expected_w, rtol=1e-6)
    assert expected_w[0] < 0.1  # the nearly clean timestep no longer dominates
    assert loss.item() == pytest.approx((expected_w.float() * per_sample).mean().item(), rel=1e-4)
    with pytest.raises(SdlabError, match="min-SNR gamma must be positive"):
        TrainSettings(out="x", data=("shapes",), min_snr_gamma=0.0)


def test_min_snr_floor_keeps_the_noisiest_timesteps_trained():
    cfg = preset("tiny-sd2")  # v-prediction: without a floor the weight goes to 0 with the SNR
    networks = new_networks(cfg, seed=0)
    plain = LatentDiffusion(cfg, *networks, min_snr_gamma=5.0)
    floored = LatentDiffusion(cfg, *networks, min_snr_gamma=5.0, min_snr_floor=0.1)
    t = torch.tensor([5, 300, 600, 999])
    w, w_floor = plain.loss_weights(t), floored.loss_weights(t)
    assert w[-1] < 0.01 and w_floor[-1] == pytest.approx(0.1)  # t = 999: the floor
    assert torch.equal(torch.maximum(w, torch.tensor(0.1)), w_floor)  # elsewhere min-SNR's own weight
    assert w_floor[1] > 0.1  # a mid timestep keeps its larger weight
    with pytest.raises(SdlabError, match="floor must be in"):
        TrainSettings(out="x", data=("shapes",), min_snr_gamma=5.0, min_snr_floor=2.0)
    with pytest.raises(SdlabError, match="needs --min-snr-gamma"):
        TrainSettings(out="x", data=("shapes",), min_snr_floor=0.1)
