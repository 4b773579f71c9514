"""``mima export``: a run's model as a diffusers pipeline folder that opens without mima, with a model card whose
numbers are the report's; refusals, atomic writes, DreamBooth outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from attack_helpers import attack_runs, copy_runs, invoke

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LOAD_ELSEWHERE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import StableDiffusionPipeline
    folder, prompt, seeds, steps, guidance, out = sys.argv[1:7]
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds.split(",")]
    res = pipe([prompt] * len(gens), num_inference_steps=int(steps), guidance_scale=float(guidance), generator=gens,
               output_type="np")
    np.save(out, (np.clip(res.images, 0, 1) * 255 + 0.5).astype(np.uint8))
    mine = sorted({m.split(".")[0] for m in sys.modules} & {"engine", "mima_cli"})
    print(json.dumps({"mima_modules": mine}))
""")


def _card_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "release"
    result = invoke("--runs-dir", built["runs"], "export", built["mima"], "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_export_opens_without_mima_and_draws_the_runs_images(built, exported, tmp_path):
    from engine.image_sets import generated_set
    from engine.models import load_pipeline, model_hash
    from engine.profile import load_profile

    out, output = exported
    assert "StableDiffusionPipeline.from_pretrained" in output
    weights = [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".json", ".md", ".txt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    # the run's own images: its utility generations of the first target, cached by the immunized model's hash
    profile = load_profile(built["runs"] / built["mima"] / "profile.toml")
    seeds = range(profile.utility.seed, profile.utility.seed + profile.utility.images)
    prompt = profile.concept("strieker").prompt
    key = model_hash(load_pipeline(built["runs"] / built["mima"]))

    def not_cached():
        raise AssertionError("the run's utility images are not in the cache")

    theirs = generated_set(not_cached, key, prompt, seeds, profile.model.sample_steps, profile.model.guidance,
                           built["runs"] / ".cache")
    script = tmp_path / "load.py"
    script.write_text(LOAD_ELSEWHERE)
    npy = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, str(script), str(out), prompt, ",".join(map(str, seeds)),
                           str(profile.model.sample_steps), str(profile.model.guidance), str(npy)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"mima_modules": []}
    np.testing.assert_array_equal(np.load(npy), theirs)


def test_the_card_is_a_hub_card_with_the_reports_numbers(built, exported):
    from huggingface_hub import ModelCard

    out, _ = exported
    card = ModelCard.load(out / "README.md")
    assert {"mima", "immunized", "text-to-image"} <= set(card.data.tags) and card.data.library_name == "diffusers"
    assert card.data.license == "other" and card.data.base_model is None  # a local base folder: no hub id
    text = card.text
    assert "strieker" in text and "checkov" in text and "[immunize]" in text  # the targets and the resolved profile
    report = invoke("--runs-dir", built["runs"], "report", built["mima"], "--json")
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    rows = _card_rows(text, "| attack | step | metric |")
    expected = []
    for p in data["pairs"]:
        for metric in dict.fromkeys([*p["msgr"], *p["mrsgr"]]):
            fmt = [("—" if p[k].get(metric) is None else f"{p[k][metric]:.2f}") for k in ("msgr", "mrsgr")]
            expected.append([p["attack"], str(p["step"]), metric, *fmt])
    assert [r[:5] for r in rows] == expected and len(expected) >= 2
    u = data["pairs"][0]["utility"]["roles"]
    primary = data["pairs"][0]["utility"]["primary"]
    utility = {r[0]: r[1:] for r in _card_rows(text, "| model | targets |")}
    for name, which in (("base", "base"), ("parent", "parent"), ("this model", "model")):
        means = u[which][primary]
        assert utility[name] == [("—" if means[r] is None else f"{means[r]:.2f}") for r in ("target", "other", "caption")]
    assert "- `lora`: steps 2" in text  # the attack it was tested against, with its settings


def _set_state(runs, run_id, **fields):
    path = runs / run_id / "status.json"
    st = json.loads(path.read_text())
    st.update(fields)
    path.write_text(json.dumps(st))


def _log_collapsed_utility(runs, run_id):
    """A utility event whose model draws none of the others its parent draws."""
    from engine.metrics.utility import Utility, UtilityPrompt

    u = Utility(["judge-acc"], "judge-acc", 0.8, [UtilityPrompt("ringo", "an artwork of ringo", "other", "ringo")],
                {"model": {"ringo": {"judge-acc": 0.0}}, "parent": {"ringo": {"judge-acc": 1.0}},
                 "base": {"ringo": {"judge-acc": 1.0}}})
    event = {"t": 0.0, "run": run_id, "phase": "utility", "step": None, "kind": "metric", "name": "utility",
             "value": 0.0, "summary": u.to_dict()}
    with open(runs / run_id / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


@pytest.mark.parametrize("spoil, words", [("failed", "did not finish (state: failed)"), ("collapsed", "collapsed")])
def test_unfinished_and_collapsed_runs_are_refused_unless_forced(built, tmp_path, spoil, words):
    runs = copy_runs(built, tmp_path)
    if spoil == "failed":
        _set_state(runs, built["jt"], state="failed")
    else:
        _log_collapsed_utility(runs, built["jt"])
    out = tmp_path / "release"
    result = invoke("--runs-dir", runs, "export", built["jt"], "--out", out)
    assert result.exit_code != 0 and words in result.output and "--force" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not _no_leftovers(tmp_path, "release")
    forced = invoke("--runs-dir", runs, "export", built["jt"], "--out", out, "--force", "--dtype", "float16")
    assert forced.exit_code == 0, forced.output
    assert "exported with --force" in forced.output
    assert "Exported with --force although" in (out / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_a_failed_export_leaves_nothing_and_an_old_export_is_replaced_only_when_asked(built, tmp_path, monkeypatch):
    import engine.export

    out = tmp_path / "release"
    first = invoke("--runs-dir", built["runs"], "export", built["mima"], "--out", out)
    assert first.exit_code == 0, first.output
    again = invoke("--runs-dir", built["runs"], "export", built["mima"], "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine.export, "model_card", broken)
    failed = invoke("--runs-dir", built["runs"], "export", built["jt"], "--out", out, "--overwrite")
    assert failed.exit_code == 1 and "disk full" in failed.output
    assert json.loads((out / "unet" / "config.json").read_text())  # the earlier export is untouched
    assert "mima" in (out / "README.md").read_text() and not _no_leftovers(tmp_path, "release")
    fresh = tmp_path / "other"
    assert invoke("--runs-dir", built["runs"], "export", built["jt"], "--out", fresh).exit_code == 1
    assert not fresh.exists() and not _no_leftovers(tmp_path, "other")
    monkeypatch.undo()
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep")
    refused = invoke("--runs-dir", built["runs"], "export", built["mima"], "--out", stranger, "--overwrite")
    assert refused.exit_code == 2 and (stranger / "notes.txt").exists()


def test_an_erase_run_and_a_dreambooth_output_export_too(built, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    runs = copy_runs(built, tmp_path)
    erased = invoke("--runs-dir", runs, "export", built["erase"], "--out", tmp_path / "erased")
    assert erased.exit_code == 0, erased.output
    card = (tmp_path / "erased" / "README.md").read_text()
    assert "erased" in card and "uce" in card
    attack = invoke("--runs-dir", runs, "attack", "--run", built["mima"], "--method", "dreambooth", "--steps", "1",
                    "--no-eval", "--save-weights")
    assert attack.exit_code == 0, attack.output
    run_id = re.search(r"dreambooth\S*: run (\S+)", attack.output).group(1)
    ambiguous = invoke("--runs-dir", runs, "export", run_id, "--out", tmp_path / "db")
    assert ambiguous.exit_code == 2 and "--concept" in ambiguous.output
    done = invoke("--runs-dir", runs, "export", run_id, "--concept", "strieker", "--out", tmp_path / "db")
    assert done.exit_code == 0, done.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "db")
    saved = UNet2DConditionModel.from_pretrained(runs / run_id / "checkpoints" / "strieker" / "unet")
    for (k, a), b in zip(pipe.unet.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), k
    assert "DreamBooth on strieker" in (tmp_path / "db" / "README.md").read_text()
    lora_run = next(r["id"] for r in attack_runs(runs) if r["method"] == "lora")
    lora = invoke("--runs-dir", runs, "export", lora_run, "--out", tmp_path / "x")
    assert lora.exit_code == 2 and "only DreamBooth" in lora.output


def test_base_license_from_the_base_card_or_the_shipped_bases(tmp_path):
    from engine.export import base_license

    assert base_license("testbed") == "apache-2.0"
    assert base_license("CompVis/stable-diffusion-v1-4", hf_cache=tmp_path) == "creativeml-openrail-m"
    repo = tmp_path / "models--someone--model"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc" / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_license("someone/model", hf_cache=tmp_path) == "mit"
    assert base_license("someone/else", hf_cache=tmp_path) is None
