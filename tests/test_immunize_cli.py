"""`mima erase` / `mima immunize` end to end on a tiny pipeline: every method, events, the model, resume."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from engine.runs import RunReader, list_runs
from mima_cli.app import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _runs(runs, kind):
    return [r for r in list_runs(runs) if r.get("kind") == kind]


def test_erase_then_immunize_mima(tmp_path, tiny_profile):
    runs = tmp_path / "runs"
    res = _invoke("--runs-dir", runs, "immunize", "--profile", tiny_profile, "--group", "g2")
    assert res.exit_code == 0, res.output
    (erase_run,) = _runs(runs, "erase")
    (imm,) = _runs(runs, "immunize")
    assert imm["state"] == "finished" and imm["parent"] == erase_run["id"] and imm["method"] == "mima"
    reader = RunReader(runs / imm["id"])
    names = {e["name"] for e in reader.events("scalar")}
    assert {"inner_loss/strieker", "inner_loss/checkov", "outer_loss", "prior_loss", "merge_residual", "grad_norm",
            "step_seconds"} <= names
    residuals = [e["value"] for e in reader.events("scalar") if e["name"] == "merge_residual"]
    assert max(residuals) < 1e-4  # the merge meets its constraints
    images = {e["name"] for e in reader.events("image")}
    assert {"samples/strieker", "samples/checkov", "samples/ringo"} <= images  # targets + one other concept
    # the immunized model opens and differs from the erased one only in the upper set (cross-attention)
    from engine.models import load_pipeline

    a, b = load_pipeline(runs / erase_run["id"]), load_pipeline(runs / imm["id"])
    pa, pb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    changed = {k for k in pa if not torch.equal(pa[k], pb[k])}
    assert changed and all(".attn2." in k for k in changed)


@pytest.mark.parametrize("method", ["jt", "cp", "imma", "alternating"])
def test_baselines_run(tmp_path, tiny_profile, method):
    runs = tmp_path / "runs"
    res = _invoke("--runs-dir", runs, "immunize", "--profile", tiny_profile, "--group", "g2", "--method", method)
    assert res.exit_code == 0, res.output
    (imm,) = _runs(runs, "immunize")
    assert imm["state"] == "finished" and imm["method"] == method
    concepts = imm["concepts"]
    assert concepts == (["strieker"] if method == "imma" else ["strieker", "checkov"])
    assert (runs / imm["id"] / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_resume_equals_uninterrupted(tmp_path, tiny_profile):
    """Run 2 steps; separately run 1 step, then resume to 2: the final weights are identical."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert _invoke("--runs-dir", full, "immunize", "-p", tiny_profile, "-g", "g2").exit_code == 0
    assert _invoke("--runs-dir", part, "erase", "-p", tiny_profile, "-g", "g2").exit_code == 0
    res = _invoke("--runs-dir", part, "immunize", "-p", tiny_profile, "-g", "g2", "--steps", "1")
    assert res.exit_code == 0
    (imm,) = _runs(part, "immunize")
    # pretend it was interrupted after step 1: its checkpoint holds step 1; resuming with 2 steps continues
    status_path = part / imm["id"] / "status.json"
    st = json.loads(status_path.read_text())
    st["state"] = "interrupted"
    status_path.write_text(json.dumps(st))
    prof = part / imm["id"] / "profile.toml"
    prof.write_text(prof.read_text().replace("steps = 1\n", "steps = 2\n", 1))
    res = _invoke("--runs-dir", part, "immunize", "--resume", imm["id"])
    assert res.exit_code == 0, res.output
    from engine.models import load_pipeline

    (ref,) = _runs(full, "immunize")
    a = load_pipeline(full / ref["id"]).unet.state_dict()
    b = load_pipeline(part / imm["id"]).unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_unknown_method_is_one_line(tmp_path, tiny_profile):
    res = runner.invoke(app, ["--runs-dir", str(tmp_path), "immunize", "-p", str(tiny_profile), "-m", "nope"])
    assert res.exit_code == 2
    assert "unknown immunization method 'nope'" in res.output and "Traceback" not in res.output


def test_erase_drops_erased_prompts_from_preserve(tmp_path, tiny_profile):
    """A preserve list naming every concept, the erased ones too, erases the same as one naming only the others."""
    styles = ("strieker", "checkov", "ringo", "cellini")
    text = tiny_profile.read_text()
    old = 'preserve = ["a photo of a star"]'
    assert old in text

    def erased_unet(name, prompts):
        prof = tmp_path / f"{name}.toml"
        listed = ", ".join(f'"{p}"' for p in ["a photo of a star", *prompts])
        prof.write_text(text.replace(old, f"preserve = [{listed}]"))
        runs = tmp_path / name
        assert _invoke("--runs-dir", runs, "erase", "-p", prof, "-g", "g2").exit_code == 0
        (run,) = _runs(runs, "erase")
        from engine.models import load_pipeline

        rows = [e["value"] for e in RunReader(runs / run["id"]).events("scalar") if e["name"] == "uce/preserved_rows"]
        return load_pipeline(runs / run["id"]).unet.state_dict(), rows

    every, rows_every = erased_unet("every", [f"an artwork of {s}" for s in styles])
    others, rows_others = erased_unet("others", [f"an artwork of {s}" for s in styles[2:]])
    assert rows_every == rows_others
    for k in every:
        torch.testing.assert_close(every[k], others[k], rtol=0, atol=0)
