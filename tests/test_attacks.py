"""Attacks on a tiny pipeline built in code: 2 steps each; the loss is finite and the step-1 batch's loss went
down; the output reloads into a fresh StableDiffusionPipeline through diffusers and reproduces the attacked model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
import torch

from engine.attacks import (
    ATTACK_JSON,
    ATTACKS,
    AttackJob,
    default_settings,
    get_attack,
    job_for_concept,
    load_attack_output,
    run_attack,
)
from engine.attacks.common import Batches, batch_loss, prompt_ids
from engine.diffusion import encode_prompts
from engine.profile import AttackMethod, AttackSettings, Concept
from engine.runs import MemoryLogger

PROMPT = "a photo of qzv cat"
TOKEN = "qzv"
# lr per method: large enough that two AdamW steps visibly lower the loss of a random tiny model
LR = {"lora": 1e-2, "dreambooth": 1e-3, "dreambooth-lora": 1e-2, "textual-inversion": 5e-2, "custom-diffusion": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from engine.testbed.build import TINY, build_random_pipeline

    folder = tmp_path_factory.mktemp("base")
    build_random_pipeline(TINY, seed=0, tokenizer_folder=tmp_path_factory.mktemp("tok")).save_pretrained(folder)
    return folder


def fresh(base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def make_job(pipe, method: str, **settings) -> AttackJob:
    prior = method in ("dreambooth", "dreambooth-lora", "custom-diffusion")
    s = default_settings(method, steps=2, lr=LR[method], batch=2, rank=2, alpha=8.0, eval_every=1, eval_images=2,
                         prior_preservation=prior, **settings)
    adds = get_attack(method).adds_token
    return AttackJob(pipe, s, images(3, 0), PROMPT, concept="c1", token=TOKEN if adds else None, init_text="cat",
                     class_prompt="cat", class_images=images(3, 1) if prior else None, sample_steps=2, guidance=2.0)


def unet_out(pipe, context):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context).sample


def embed(pipe, prompt=PROMPT):
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt])


@pytest.mark.parametrize("method", list(ATTACKS))
def test_attack_trains_saves_and_reloads(method, base_dir, tmp_path):
    pipe = fresh(base_dir)
    job = make_job(pipe, method)  # LoRA: rank 2, alpha 8
    if method == "dreambooth":
        job = replace(job, base=str(base_dir))
    init_embedding = embed(pipe, "a photo of cat cat") if job.token else None
    log = MemoryLogger()
    result = run_attack(job, log, out=tmp_path / "out")

    # loss: finite, logged every step; the batch of step 1 has a lower loss after training than before
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert log.scalars("loss/c1") == result.losses
    lat, noise, t = Batches(job)(1)
    with torch.no_grad():
        after, _ = batch_loss(job, pipe.text_encoder(prompt_ids(job))[0], lat, noise, t)
    assert float(after) < result.losses[0] - 1e-4

    # evaluation: step 0 and every step, fixed seeds, logged one image per event; the attack changed the images
    assert sorted(result.eval_images) == [0, 1, 2]
    assert all(v.shape == (2, 64, 64, 3) and v.dtype == np.uint8 for v in result.eval_images.values())
    shots = [e for e in log.events if e["kind"] == "image"]
    assert [(e["step"], e["tags"]["seed"]) for e in shots] == [(s, 90_000 + i) for s in (0, 1, 2) for i in (0, 1)]
    assert np.abs(result.eval_images[2].astype(int) - result.eval_images[0]).max() > 0

    # the output reloads into a fresh pipeline and reproduces the attacked model
    assert json.loads((tmp_path / "out" / ATTACK_JSON).read_text())["method"] == method
    reloaded = load_attack_output(fresh(base_dir), tmp_path / "out")
    c_att, c_rel = embed(pipe), embed(reloaded)
    torch.testing.assert_close(c_rel, c_att, atol=1e-5, rtol=0)
    torch.testing.assert_close(unet_out(reloaded, c_rel), unet_out(pipe, c_att), atol=1e-5, rtol=0)
    if method == "textual-inversion":  # the token's embedding moved away from its initialisation (the class word)
        assert (c_att - init_embedding).abs().max() > 1e-4
    else:  # the UNet changed
        assert (unet_out(pipe, c_att) - unet_out(fresh(base_dir), c_att)).abs().max() > 1e-4
    if "lora" in method:  # alpha != rank survives the round trip
        scalings = {v for m in reloaded.unet.modules() if hasattr(m, "scaling") for v in m.scaling.values()}
        assert scalings == {4.0}
    if method == "dreambooth":  # a mima model folder: engine.models opens it on top of its base
        from engine.models import load_pipeline

        opened = load_pipeline(tmp_path / "out")
        torch.testing.assert_close(unet_out(opened, c_att), unet_out(pipe, c_att), atol=1e-5, rtol=0)


def test_custom_diffusion_file_is_what_diffusers_parses(base_dir, tmp_path):
    """diffusers' own Custom Diffusion parser (``load_attn_procs`` with a state dict) reads the saved weights; the
    self-attention entries that safetensors drops are given back as empty dicts, as ``save_attn_procs`` makes them."""
    from safetensors.torch import load_file

    pipe = fresh(base_dir)
    run_attack(replace(make_job(pipe, "custom-diffusion"), eval_at_start=False), out=tmp_path)
    state = load_file(tmp_path / "pytorch_custom_diffusion_weights.safetensors")
    target = fresh(base_dir)
    empty = {name: {} for name in target.unet.attn_processors if not any(k.startswith(name + ".") for k in state)}
    assert empty and all(n.endswith("attn1.processor") for n in empty)
    target.unet.load_attn_procs({**state, **empty}, _pipeline=target)
    target.load_textual_inversion(tmp_path)
    torch.testing.assert_close(unet_out(target, embed(target)), unet_out(pipe, embed(pipe)), atol=1e-5, rtol=0)


def test_custom_diffusion_processors_start_as_the_model(base_dir):
    """Custom Diffusion's k/v processors, freshly installed, compute what the model did (they copy its k/v), so
    training starts from the attacked model; a processor that reads its own weights wrong would show here."""
    from engine.attacks.custom_diffusion import install_kv_processors

    pipe = fresh(base_dir)
    context = embed(pipe)
    before = unet_out(pipe, context)
    params = install_kv_processors(pipe.unet)
    assert params and all(p.requires_grad for p in params)
    torch.testing.assert_close(unet_out(pipe, context), before, atol=1e-6, rtol=0)
    with torch.no_grad():  # the processors' own value weights are the ones used
        params[1].add_(torch.randn(params[1].shape, generator=torch.Generator().manual_seed(0)) * params[1].std())
    assert float((unet_out(pipe, context) - before).norm() / before.norm()) > 1e-3


def test_attack_is_a_pure_function_of_its_inputs(base_dir):
    from engine.sampling import generate

    runs = [run_attack(replace(make_job(fresh(base_dir), "lora"), seed=3)) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    for step in (0, 1, 2):
        np.testing.assert_array_equal(runs[0].eval_images[step], runs[1].eval_images[step])
    # step 0 is the untouched model with the fixed evaluation seeds
    np.testing.assert_array_equal(runs[0].eval_images[0], generate(fresh(base_dir), PROMPT, [90_000, 90_001], 2, 2.0))
    other = run_attack(replace(make_job(fresh(base_dir), "lora"), seed=4, eval_at_start=False))
    assert other.losses != runs[0].losses


def test_registry_matches_the_profile_methods():
    assert set(ATTACKS) == set(get_args(AttackMethod))
    with pytest.raises(ValueError, match="unknown attack 'nope'; expected one of lora, dreambooth"):
        get_attack("nope")
    s = default_settings("textual-inversion")
    assert isinstance(s, AttackSettings) and (s.steps, s.lr) == (3000, 5e-4)
    assert default_settings("lora", rank=8).alpha == 8.0 and default_settings("lora", rank=8, alpha=2.0).alpha == 2.0


def test_job_for_concept_uses_the_attackers_token():
    concept = Concept(name="pet", prompt="a photo of sks cat", token="sks", class_prompt="cat", kind="personal")
    arr = images(2, 0)
    settings = default_settings("textual-inversion", token="qzv", eval_prompt="a photo of {token}")
    job = job_for_concept(None, concept, settings, arr)
    assert (job.prompt, job.eval_prompt) == ("a photo of qzv cat", "a photo of qzv")
    assert (job.token, job.init_text) == ("qzv", "cat")
    db = job_for_concept(None, concept, default_settings("dreambooth-lora", token="qzv"), arr, class_images=arr)
    assert db.token is None and db.prompt == "a photo of qzv cat" and db.class_prompt == "cat"
    with pytest.raises(ValueError, match="different one"):
        job_for_concept(None, concept, replace(settings, token="sks"), arr)
    with pytest.raises(ValueError, match="needs the attacker's token"):
        job_for_concept(None, concept, replace(settings, token=None), arr)
    style = Concept(name="monet", prompt="an artwork of Claude Monet", class_prompt="artwork", kind="style")
    assert job_for_concept(None, style, default_settings("lora"), arr).prompt == "an artwork of Claude Monet"
    with pytest.raises(ValueError, match="class_images"):
        job_for_concept(None, concept, default_settings("dreambooth", token="qzv"), arr)


def test_new_token_must_be_new(base_dir):
    job = replace(make_job(fresh(base_dir), "textual-inversion"), prompt="a photo of cat", token="cat")
    with pytest.raises(ValueError, match="already in the tokenizer"):
        run_attack(job)


def _python_blocks(markdown: str) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_custom_diffusion_readme_loader_reproduces_mimas_image(base_dir, tmp_path):
    """The README written beside Custom Diffusion weights, run as written in a process that never imports mima's CLI,
    draws mima's own last evaluation image of the attacked model (diffusers' load_attn_procs alone would not)."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.sampling import generate

    pipe = fresh(base_dir)
    job = replace(make_job(pipe, "custom-diffusion"), base=str(base_dir), eval_at_start=False)
    result = run_attack(job, out=tmp_path / "out")
    mimas = result.eval_images[max(result.eval_images)][0]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "load_attn_procs" in readme and "load_custom_diffusion" in readme
    (code,) = _python_blocks(readme)
    code += ("\nimport sys, numpy as np\n"
             "assert not any(m == 'mima_cli' or m.startswith('mima_cli.') for m in sys.modules)\n"
             f"np.save({str(tmp_path / 'image.npy')!r}, np.asarray(image))\n")
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = np.load(tmp_path / "image.npy").astype(int)
    unattacked = generate(fresh(base_dir), job.eval_text, job.eval_seeds[:1], job.sample_steps, job.guidance)[0]
    assert np.abs(loaded - mimas).max() <= 1  # mima's image (up to rounding to 8 bits)
    assert np.abs(unattacked.astype(int) - mimas).max() > 8  # the weights matter: a loader that ignored them fails
