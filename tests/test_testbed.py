"""The testbed world, tokenizer, tiny build and shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.testbed import world
from engine.testbed.build import TINY, build_random_pipeline
from engine.testbed.tokenizer import write_clip_tokenizer


def test_world_is_deterministic_per_seed():
    items = world.training_items(24, seed=3, personal=True)
    assert items == world.training_items(24, seed=3, personal=True)
    a, b = world.render_many(items, seed=5), world.render_many(items, seed=5)
    assert a.dtype == np.uint8 and a.shape == (24, 64, 64, 3)
    assert np.array_equal(a, b)
    c = world.render_many(items, seed=6)
    assert not np.array_equal(a, c)
    # two concepts with the same seed do not share a layout or palette
    s1, s2 = world.concept_images("strieker", 2, 0), world.concept_images("pointelle", 2, 0)
    assert np.abs(s1.astype(int) - s2.astype(int)).mean() > 20


def test_world_covers_every_concept_with_labels():
    assert len(world.STYLES) >= 8 and len(world.OBJECTS) >= 8 and len(world.PERSONAL) >= 6
    for name in (*world.STYLES, *world.OBJECTS, *world.PERSONAL_BY_NAME, "artwork", "object"):
        img = world.concept_images(name, 1, 0)[0]
        assert img.std() > 5, name  # not blank
    s, o, p = world.Item(personal="redstar").labels()
    assert (s, o, p) == (len(world.STYLES), world.OBJECTS.index("star"), 0)
    assert world.Item(style="cellini", object="fish").prompt() == "a photo of a fish, artwork of cellini"
    with pytest.raises(KeyError, match="unknown testbed concept"):
        world.item_for("picasso")


def test_look_prompts_name_what_is_drawn_and_parse_back():
    """Object prompts name some or all of a look, and the world reads such a prompt back to the same item."""
    look = world.Look("purple", "lower", "yellow", "eye")
    assert world.object_prompt("fish", look) == "a photo of a purple fish with yellow lower half and an eye"
    assert world.object_prompt("house", world.Look("teal", "plain")) == "a photo of a plain teal house"
    items = [it for it in world.training_items(600, seed=2) if it.look]
    assert len(items) > 50 and len({it.look.detail for it in items}) == len(world.DETAILS) + 1
    for it in items:
        assert world.item_for_prompt(it.prompt()) == it, it.prompt()
    with pytest.raises(KeyError):
        world.item_for_prompt("a photo of a red star with yellow tips and yellow tips")
    # the named body colour is what the silhouette is painted in (a sixth of the image or more), another one is not
    for colour, other in (("blue", "orange"), ("orange", "teal"), ("green", "purple")):
        imgs = world.render_many([world.Item(object="heart", look=world.Look(colour, "plain"))] * 6, seed=1) / 255
        share = {c: float((np.linalg.norm(imgs - np.array(world.COLOURS[c]) / 255, axis=-1) < 0.15).mean())
                 for c in (colour, other)}
        assert share[colour] > 0.12 and share[other] < 0.02, (colour, share)


def test_ordinary_objects_never_wear_a_personal_look():
    """A personal instance's look is never drawn for an ordinary object (the base model must not learn it), even when
    a prompt names all of it but the detail, and no training prompt names it whole."""
    rng = np.random.default_rng(0)
    for p in world.PERSONAL:
        body, pattern, accent, detail = world.personal_look(p)
        key = world._look_key(p.object, body, pattern, accent, detail)
        partial = world.Look(body, pattern, accent if pattern != "plain" else None)
        drawn = {world._look_key(p.object, *world._resolve_look(p.object, partial, rng)) for _ in range(300)}
        assert key not in drawn and len(drawn) > 3, p.name
        named = {world._look_key(p.object, *world._resolve_look(p.object, world.random_look(p.object, rng), rng))
                 for _ in range(3000)}
        assert key not in named, p.name


def test_whole_look_share_adds_named_personal_looks_and_keeps_the_rest_of_the_mix():
    """``whole_look_share`` replaces that share of the items by ordinary objects wearing a personal instance's whole
    look, named in words (object label, no personal label, never the token); every other item is the one the share-0
    mix draws, so builds without it (v4) keep their data."""
    plain = world.training_items(600, seed=2)
    mixed = world.training_items(600, seed=2, whole_look_share=0.05)
    changed = [i for i, (a, b) in enumerate(zip(plain, mixed)) if a != b]
    assert len(mixed) == 600 and 25 <= len(changed) <= 30  # 30 replaced (one that drew the same look is unchanged)
    wholes = {world.whole_look(p): p for p in world.PERSONAL}
    for i in changed:
        it, p = mixed[i], wholes[mixed[i].look]
        assert it.object == p.object and it.personal is None and it.labels()[2] == len(world.PERSONAL)
        # (purplehouse's prompt does not name its door's colour: the words name what they can)
        assert world.item_for_prompt(it.prompt()).prompt() == it.prompt() and "sks" not in it.prompt()
        drawn = world._resolve_look(it.object, it.look, np.random.default_rng(i))
        assert world._look_key(it.object, *drawn) == world._look_key(p.object, *world.personal_look(p))
    assert {mixed[i].look for i in changed} == set(wholes)
    assert world.training_items(600, seed=2, whole_look_share=0.05) == mixed  # seeded
    assert not any(it.look in wholes for it in plain)


def test_build_setting_whole_look_share_reaches_the_data(tmp_path):
    """`mima testbed build --set whole_look_share=0.1` trains on prompts that name the instances' whole looks."""
    from engine.testbed.train import stage_data

    cfg = TINY.with_overrides(["whole_look_share=0.1"])
    stage_data(tmp_path, cfg, 0, lambda *a: None)
    prompts = set(np.load(tmp_path / "data.npz")["prompts"].tolist())
    named = {world.object_prompt(p.object, world.whole_look(p)) for p in world.PERSONAL}
    assert named & prompts and TINY.whole_look_share == 0.0


def test_style_is_not_palette():
    """Colour statistics of different styles overlap: the palette distribution is shared."""
    means = {s: world.concept_images(s, 40, 1).reshape(40, -1, 3).mean(1).mean(0) for s in world.STYLES}
    spread = np.std(np.stack(list(means.values())), axis=0)
    assert spread.max() < 25  # per-style mean colours within a few grey levels of each other


def test_style_patterns_are_coarser_than_the_latent_grid():
    """Every style's dominant period spans at least 3 latent pixels of the 4x VAE (12 px): patterns near the latent
    grid's Nyquist limit came out of the UNet as one generic texture."""
    f = np.fft.fftfreq(world.SIZE)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    for style in world.STYLES:
        grey = world.concept_images(style, 16, 3).astype(np.float32).mean(-1)
        power = (np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True))) ** 2).mean(0)
        power[radius == 0] = 0
        assert 1 / radius.flat[power.argmax()] >= 12, style


PROMPTS = ["an artwork of strieker", "a photo of a fish, artwork of cellini", "a photo of sks star",
           "an artwork of Kelly Mckernan", "Hello,  World café", ""]


def test_personal_looks_are_coarse_regions():
    """Each personal instance's accent is a coarse part of its silhouette (a fifth of it or more), not a fine mark: no
    attack learned dots, stripes or checks of 7-10 px within 160 steps on the testbed UNet."""
    from dataclasses import replace

    for p in world.PERSONAL:
        if p.pattern == "plain":
            continue
        for seed in range(4):
            drawn = world._personal_image(p, np.random.default_rng(seed))
            no_accent = world._personal_image(replace(p, accent=p.body), np.random.default_rng(seed))
            rng = np.random.default_rng(seed)  # the silhouette: _personal_image's background, then its placement
            world._background(rng, np.array(p.body, dtype=np.float32) / 255)
            silhouette = world._mask(world._shape_polys(p.object), *world._placement(rng, p.object, personal=True)) > 0.5
            accent = np.abs(drawn - no_accent).sum(-1) > 0.1
            assert accent.sum() >= 0.2 * silhouette.sum(), (p.name, seed, accent.sum(), silhouette.sum())


def test_tokenizer_matches_open_clip(tmp_path):
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, 32))
    for prompt in PROMPTS:
        ours = tok(prompt, padding="max_length", max_length=32, truncation=True).input_ids
        theirs = open_clip.tokenize([prompt], context_length=32)[0].tolist()
        n = theirs.index(49407) + 1
        assert ours[:n] == theirs[:n], prompt
        assert all(t == 49407 for t in ours[n:])  # SD 1.x padding


def test_tiny_build_trains_exports_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    from engine.sampling import generate
    from engine.testbed.train import build_testbed

    seen = []
    timings = build_testbed(tmp_path, TINY, seed=0, progress=lambda *a: seen.append(a[0]))
    assert set(timings) == {"data", "vae", "latents", "judge", "text", "unet", "export"}
    assert {"data", "vae", "latents", "judge", "text", "unet"} <= set(seen)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    assert pipe.safety_checker is None
    assert pipe.text_encoder.config.hidden_size == TINY.text_width
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the latents
    pipe.set_progress_bar_config(disable=True)
    # exported in one dtype: plain from_pretrained generates without a cast
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    img = generate(pipe, "an artwork of ringo", [0], steps=2, guidance=2.0)
    assert img.shape == (1, 64, 64, 3)
    # a second call finds every stage done and changes nothing
    before = (tmp_path / "unet.ckpt").stat().st_mtime_ns
    assert build_testbed(tmp_path, TINY, seed=0) == timings
    assert (tmp_path / "unet.ckpt").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another configuration"):
        build_testbed(tmp_path, TINY.__class__(**{**TINY.to_dict(), "unet_steps": 3}))


def test_build_continues_from_a_pipeline(tmp_path):
    """`--set init_from=PIPELINE` takes its VAE, text encoder, scaling and the judge beside it as they are and starts
    the UNet from its UNet: with unet_lr 0 the continued build's pipeline is the first one; with training it moves
    from there. A folder of another architecture is a clear error."""
    from diffusers import StableDiffusionPipeline

    from engine.testbed.train import build_testbed

    first = tmp_path / "a"
    build_testbed(first, TINY, seed=0)  # a/pipeline, and a/judge.safetensors beside it

    def weights(folder):
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        return {f"{n}.{k}": v for n in ("vae", "text_encoder", "unet") for k, v in getattr(pipe, n).state_dict().items()}, pipe

    ref, ref_pipe = weights(first / "pipeline")
    same = TINY.with_overrides([f"init_from={first / 'pipeline'}", "unet_lr=0.0", "unet_steps=3"])
    build_testbed(tmp_path / "b", same, seed=5)
    got, pipe = weights(tmp_path / "b" / "pipeline")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert pipe.vae.config.scaling_factor == ref_pipe.vae.config.scaling_factor
    assert (tmp_path / "b" / "judge.safetensors").read_bytes() == (first / "judge.safetensors").read_bytes()
    moved = TINY.with_overrides([f"init_from={first / 'pipeline'}", "unet_lr=0.01", "unet_steps=3"])
    build_testbed(tmp_path / "c", moved, seed=5)
    got, _ = weights(tmp_path / "c" / "pipeline")
    assert all(torch.equal(got[k], ref[k]) for k in ref if not k.startswith("unet."))
    assert any(not torch.equal(got[k], ref[k]) for k in ref if k.startswith("unet."))
    other = TINY.with_overrides([f"init_from={first / 'pipeline'}", "unet_channels=[16, 48]"])
    with pytest.raises(ValueError, match="init_from: .* not the architecture"):
        build_testbed(tmp_path / "d", other, seed=5)
    with pytest.raises(ValueError, match="init_from: .* has no vae/"):  # before any stage has run
        build_testbed(tmp_path / "e", TINY.with_overrides([f"init_from={tmp_path / 'none'}"]), seed=5)
    assert not (tmp_path / "e" / "data.npz").exists()


def test_interrupted_stage_keeps_its_time(tmp_path, monkeypatch):
    """A stage cut short (Ctrl-C, a killed job) still has its time in timings.json, and a resumed build adds to it,
    so the build time reported for a build resumed several times is the whole of it."""
    from engine.testbed import train

    monkeypatch.setattr(train, "TIMINGS_EVERY_S", 0.0)

    def stop_in_vae(stage, step, total, info):
        if stage == "vae" and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.build_testbed(tmp_path, TINY, seed=0, progress=stop_in_vae)
    first = json.loads((tmp_path / "timings.json").read_text())
    assert first["vae"] > 0 and not (tmp_path / "vae.done").exists()
    timings = train.build_testbed(tmp_path, TINY, seed=0, stages=("data", "vae"))
    assert timings["vae"] > first["vae"] and timings["data"] == first["data"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_build_on_cuda_exports_a_cpu_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from engine.testbed.train import build_testbed

    build_testbed(tmp_path, TINY, seed=0, device="cuda")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    assert pipe.unet.device.type == "cpu"


@pytest.mark.parametrize("stage", ["text", "unet"])
def test_stage_resume_equals_uninterrupted(tmp_path, stage):
    """Stopping a stage after step 1 and resuming gives the same weights as 2 uninterrupted steps."""
    import dataclasses
    import shutil

    from engine.testbed import train

    steps = f"{stage}_steps"
    cfg = dataclasses.replace(TINY, **{steps: 2})
    run = {"text": train.stage_text, "unet": lambda *a: train.stage_unet(*a, eval_every=0)}[stage]
    a, b = tmp_path / "a", tmp_path / "b"
    train.build_testbed(a, cfg, stages=("data", "vae", "latents") + (("text",) if stage == "unet" else ()))
    shutil.copytree(a, b)
    run(a, cfg, 0, train._noop)
    run(b, dataclasses.replace(cfg, **{steps: 1}), 0, train._noop)
    run(b, cfg, 0, train._noop)
    ka, kb = train._load(a / f"{stage}.ckpt"), train._load(b / f"{stage}.ckpt")
    assert ka["step"] == kb["step"] == 2
    for k in ka[stage]:
        torch.testing.assert_close(ka[stage][k], kb[stage][k], rtol=0, atol=0)


def test_text_stage_spreads_each_prompt_over_its_eos_and_padding(tmp_path):
    """After the text stage, prompts that differ only in their object differ at EOS and padding too (a random
    encoder changes only the object's own token and what attends to it, and the UNet then ignores the prompt)."""
    import dataclasses

    from engine.diffusion import tokenize
    from engine.testbed import train
    from engine.testbed.build import make_tokenizer

    cfg = dataclasses.replace(TINY, n_images=400, text_steps=60)
    train.build_testbed(tmp_path, cfg, stages=("data", "text"))
    tok = make_tokenizer(cfg, tmp_path / "tokenizer")
    ids = tokenize(tok, [world.object_prompt(o) for o in world.OBJECTS])
    tail = slice(int((ids[0] == tok.eos_token_id).int().argmax()), None)  # same length for every object prompt

    def tail_spread(text) -> float:
        with torch.no_grad():
            h = text(ids)[0][:, tail]
        return float((h - h.mean(0)).norm(dim=-1).mean() / h.norm(dim=-1).mean())

    assert tail_spread(train._trained_text(tmp_path, cfg)) > 3 * tail_spread(train._fresh_text_encoder(cfg, seed=0))
    # and prompts that differ only in the body colour they name (the colours of one token each): 2.3x the random
    # encoder's spread with the look heads of the probe, 0.5x without them (measured on this configuration)
    prompts = [world.object_prompt("star", world.Look(c)) for c in world.COLOURS]
    ids = tokenize(tok, prompts)
    eos = (ids == tok.eos_token_id).int().argmax(1)
    ids = ids[eos == eos.min()]
    assert len(ids) >= 6
    tail = slice(int(eos.min()), None)
    assert tail_spread(train._trained_text(tmp_path, cfg)) > 1.5 * tail_spread(train._fresh_text_encoder(cfg, seed=0))


def test_unet_mix_weights_draw_each_kind_in_its_proportion():
    from engine.testbed.train import _mix_weights

    items = world.training_items(2000, seed=1)
    labels = np.array([it.labels() for it in items])
    w = _mix_weights(labels, (0.4, 0.4, 0.12, 0.08))
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    kind = lambda it: 0 if it.style and not it.object else 1 if it.object and not it.style else 2 if it.style else 3
    share = np.bincount([kind(it) for it in items], weights=w.numpy(), minlength=4)
    np.testing.assert_allclose(share, [0.4, 0.4, 0.12, 0.08], atol=1e-9)


def test_random_pipeline_has_the_testbed_architecture():
    pipe = build_random_pipeline(TINY)
    assert pipe.unet.config.cross_attention_dim == TINY.text_width
    assert pipe.tokenizer.model_max_length == TINY.max_length


from engine.testbed import JUDGE_FILE, PIPELINE_DIR  # noqa: E402

needs_weights = pytest.mark.skipif(
    not (PIPELINE_DIR / "model_index.json").exists() or not JUDGE_FILE.exists(),
    reason="the trained testbed is not in the package yet (build it: mima testbed build --install)",
)


@needs_weights
def test_shipped_pipeline_loads_and_judge_recognises_fresh_renders():
    from diffusers import StableDiffusionPipeline

    from engine.testbed import PIPELINE_DIR, load_judge, load_pipeline
    from engine.testbed.judge import accuracy

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 128
    assert pipe.safety_checker is None
    assert load_pipeline().unet.dtype == torch.float32
    judge = load_judge()
    for concept in (*world.STYLES, *world.OBJECTS, *world.PERSONAL_BY_NAME):
        images = world.concept_images(concept, 5, seed=31337)  # a seed no training batch used
        assert accuracy(judge, images, concept) >= 0.8, concept


@pytest.mark.parametrize("device, message", [("foo", "not a torch device"), ("cuda:99", "no CUDA device")])
def test_build_rejects_a_bad_device_before_any_work(tmp_path, device, message):
    from typer.testing import CliRunner

    from mima_cli.app import app

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    res = CliRunner().invoke(app, ["testbed", "build", "--tiny", "--out", str(tmp_path / "b"), "--device", device])
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "b").exists()


def test_build_config_overrides_are_typed_and_checked():
    from engine.testbed.build import DEFAULT

    cfg = DEFAULT.with_overrides(["unet_steps=20000", "unet_lr=2e-3", "unet_channels=[48, 96, 128]", "guidance_scale=5"])
    assert (cfg.unet_steps, cfg.unet_lr, cfg.unet_channels, cfg.guidance_scale) == (20000, 2e-3, (48, 96, 128), 5.0)
    assert cfg.vae_steps == DEFAULT.vae_steps
    assert DEFAULT.with_overrides(["unet_mix=[1, 0, 0, 0]"]).unet_mix == (1.0, 0.0, 0.0, 0.0)  # ints where floats go
    for bad, message in [("unet_step=3", "unknown testbed setting 'unet_step'"), ("unet_steps=1.5", "takes a value like"),
                         ("unet_channels=[1.5]", "takes a value like"), ("unet_steps", "expected KEY=VALUE"),
                         ("unet_steps=[3]", "takes a value like"), ("unet_channels=32", "takes a value like")]:
        with pytest.raises(ValueError, match=message):
            DEFAULT.with_overrides([bad])


def test_build_set_changes_the_configuration_a_folder_resumes_with(tmp_path):
    from typer.testing import CliRunner

    from mima_cli.app import app

    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["testbed", "build", "--tiny", "--out", str(out), "--set", "unet_steps=3"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["unet_steps"] == 3
    again = CliRunner().invoke(app, ["testbed", "build", "--tiny", "--out", str(out)])  # other settings: refused
    assert again.exit_code == 2 and "another configuration" in again.output
    bad = CliRunner().invoke(app, ["testbed", "build", "--tiny", "--out", str(tmp_path / "c"), "--set", "nope=1"])
    assert bad.exit_code == 2 and "unknown testbed setting 'nope'" in bad.output and "Traceback" not in bad.output


def test_build_set_refuses_non_finite_numbers():
    from engine.testbed.build import DEFAULT

    for bad in ("unet_lr=inf", "vae_lr=nan", "unet_mix=[0.5, inf, 0.1, 0.1]"):
        with pytest.raises(ValueError, match=r"expected a finite number"):
            DEFAULT.with_overrides([bad])


def _doc_block(doc: str, marker: str) -> str:
    """The ```python block of the Markdown file ``doc`` (relative to the repository) that contains ``marker``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"expected one python block of {doc} with {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_docs_plain_diffusers_snippet_runs_without_mima(tmp_path):
    """docs/testbed.md's plain-diffusers snippet, as written, in a fresh process that never imports mima's CLI: it loads
    the shipped testbed and generates (a text encoder stored in another dtype than the rest made this crash)."""
    import subprocess
    import sys
    from pathlib import Path

    snippet = _doc_block("docs/testbed.md", "engine.testbed.PIPELINE_DIR")
    assert "image = pipe(" in snippet
    check = ("\nimport sys, numpy as np\n"
             "assert not any(m == 'mima_cli' or m.startswith('mima_cli.') for m in sys.modules)\n"
             "dtypes = {str(p.dtype) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}\n"
             "assert dtypes == {'torch.float32'}, dtypes\n"
             "a = np.asarray(image)\n"
             "assert a.shape == (64, 64, 3) and a.std() > 5, (a.shape, a.std())\n"
             "print('snippet ok')\n")
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "snippet ok" in res.stdout, res.stderr[-2000:]


def test_shipped_pipeline_is_stored_in_one_dtype():
    from safetensors import safe_open

    from engine.testbed import PIPELINE_DIR

    for name in ("unet", "vae", "text_encoder"):
        (path,) = (PIPELINE_DIR / name).glob("*.safetensors")
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, name
    assert json.loads((PIPELINE_DIR / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
