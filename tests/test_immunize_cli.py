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


# ------------------------------------------------------------------------------------------- reliability


def _checkpoint_tensors(run_dir):
    from safetensors.torch import load_file

    return [load_file(f) for f in sorted((run_dir / "checkpoints").glob("step-*/unet_changed.safetensors"))]


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_profile, tiny_pipeline_dir):
    """An outer step that makes the weights infinite (inf learning rate, set past the profile's validation):
    the run stops with a message naming what the checkpoints hold, and no checkpoint holds a non-finite tensor."""
    from engine.immunize.runner import ImmunizationError, immunize
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.steps=3", "immunize.checkpoint_every=1", "immunize.sample_every=0"])
    p.immunize.outer_lr = float("inf")
    runs = tmp_path / "runs"
    with pytest.raises(ImmunizationError, match=r"weights after step 1 are not finite.*no checkpoint was kept"):
        immunize(p, runs_dir=runs, group="g2", parent=str(tiny_pipeline_dir))
    (imm,) = _runs(runs, "immunize")
    assert imm["state"] == "failed"
    assert _checkpoint_tensors(runs / imm["id"]) == []
    assert not (runs / imm["id"] / "checkpoints" / "latest").exists()


def test_divergence_keeps_the_last_finite_checkpoint_and_names_its_step(tmp_path, tiny_profile, tiny_pipeline_dir):
    """A huge but finite learning rate: step 1's weights are finite and checkpointed, step 2's loss is not; the
    message names step 1, the checkpoint on disk holds step 1 and every tensor in it is finite."""
    from engine.immunize.runner import ImmunizationError, checkpoint_step, immunize
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.steps=3", "immunize.outer_lr=1e30", "immunize.sample_every=0",
                                    "immunize.checkpoint_every=0"])
    runs = tmp_path / "runs"
    with pytest.raises(ImmunizationError, match=r"at step 2; the last good checkpoint holds step 1$"):
        immunize(p, runs_dir=runs, group="g2", parent=str(tiny_pipeline_dir))
    (imm,) = _runs(runs, "immunize")
    assert checkpoint_step(runs / imm["id"]) == 1
    (tensors,) = _checkpoint_tensors(runs / imm["id"])
    assert tensors and all(bool(torch.isfinite(v).all()) for v in tensors.values())


def test_inf_on_the_command_line_is_a_profile_error(tmp_path, tiny_profile):
    runs = tmp_path / "runs"
    res = runner.invoke(app, ["--runs-dir", str(runs), "immunize", "-p", str(tiny_profile), "-g", "g2",
                              "--set", "immunize.outer_lr=inf"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line == "error: --set immunize.outer_lr=inf: expected a finite number, got inf" or (
        "--set immunize.outer_lr=inf" in line and "finite" in line and "\n" not in line), res.output
    assert not runs.exists()  # refused before any run (the erase included) was written


def test_unknown_method_suggests_and_none_is_explained(tmp_path, tiny_profile):
    res = runner.invoke(app, ["--runs-dir", str(tmp_path), "immunize", "-p", str(tiny_profile), "-m", "mimma"])
    assert res.exit_code == 2 and "did you mean 'mima'?" in res.output
    res = runner.invoke(app, ["--runs-dir", str(tmp_path), "immunize", "-p", str(tiny_profile), "-m", "none"])
    assert res.exit_code == 2 and "mima attack --control" in res.output and len(res.output.strip().splitlines()) == 1


def test_resume_of_an_unknown_run_is_a_usage_error(tmp_path):
    res = runner.invoke(app, ["--runs-dir", str(tmp_path), "immunize", "--resume", "nope"])
    assert res.exit_code == 2 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_ctrl_c_names_the_resume_command(tmp_path, tiny_profile, tiny_pipeline_dir, monkeypatch):
    """Ctrl-C after step 1 (the deferred interrupt flag set by the first step): exit 130 and the exact command."""
    from engine.immunize import runner as imm_runner

    real = imm_runner.outer_step

    def step_then_ctrl_c(setup, opt, profile, step):
        stats = real(setup, opt, profile, step)
        import signal

        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what a Ctrl-C during the step does
        return stats

    monkeypatch.setattr(imm_runner, "outer_step", step_then_ctrl_c)
    runs = tmp_path / "my runs"
    res = runner.invoke(app, ["--runs-dir", str(runs), "immunize", "-p", str(tiny_profile), "-g", "g2",
                              "--parent", str(tiny_pipeline_dir), "--set", "immunize.sample_every=0"])
    assert res.exit_code == 130, res.output
    (imm,) = _runs(runs, "immunize")
    assert imm["state"] == "interrupted"
    assert f"resume with: mima --runs-dir '{runs}' immunize --resume {imm['id']}" in res.output
    assert "checkpoint holds step 1" in res.output


def test_memory_switches_give_the_same_weights(tmp_path, tiny_profile, tiny_pipeline_dir):
    """``gradient_checkpointing`` and a fused or one-tensor-at-a-time AdamW change how the step runs, not what it
    computes: two outer steps end at the default run's weights (to float32 rounding)."""
    from engine.immunize.runner import immunize
    from engine.models import load_pipeline
    from engine.profile import load_profile

    base = ["immunize.steps=2", "immunize.checkpoint_every=2", "immunize.sample_every=0", "utility.enabled=false"]
    weights = []
    for extra in ([], ["immunize.gradient_checkpointing=true", "immunize.adam=\"fused\""],
                  ["immunize.adam=\"for-loop\""]):
        runs = tmp_path / f"runs{len(weights)}"
        immunize(load_profile(tiny_profile, base + extra), runs_dir=runs, group="g2", parent=str(tiny_pipeline_dir))
        (imm,) = _runs(runs, "immunize")
        (tensors,) = _checkpoint_tensors(runs / imm["id"])
        weights.append(tensors)
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    start = dict(load_pipeline(tiny_pipeline_dir).unet.named_parameters())
    for other in weights[1:]:
        for k, v in weights[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, start[k]) for k, v in weights[0].items())  # the steps moved the weights


def test_autocast_keeps_float32_weights_that_move_as_the_float32_run_does(tmp_path, tiny_profile, tiny_pipeline_dir):
    """``[immunize] autocast = "bfloat16"``: the kept weights are float32 (the master weights), not those of the
    float32 run bit for bit (the passes ran in bf16), and two outer steps move them the same way."""
    from engine.immunize.runner import immunize
    from engine.models import load_pipeline
    from engine.profile import load_profile

    base = ["immunize.steps=2", "immunize.checkpoint_every=2", "immunize.sample_every=0", "utility.enabled=false"]
    moved = []
    start = dict(load_pipeline(tiny_pipeline_dir).unet.named_parameters())
    for extra in ([], ["immunize.autocast=\"bfloat16\""]):
        runs = tmp_path / f"runs{len(moved)}"
        immunize(load_profile(tiny_profile, base + extra), runs_dir=runs, group="g2", parent=str(tiny_pipeline_dir))
        (imm,) = _runs(runs, "immunize")
        (tensors,) = _checkpoint_tensors(runs / imm["id"])
        assert {v.dtype for v in tensors.values()} == {torch.float32}
        moved.append(torch.cat([(v - start[k].detach()).flatten() for k, v in sorted(tensors.items())]))
    full, mixed = moved
    assert not torch.equal(full, mixed) and full.norm() > 0
    assert float(torch.nn.functional.cosine_similarity(full, mixed, dim=0)) > 0.9


def test_gradient_checkpointing_with_the_exact_gradient_names_the_field(tiny_profile):
    from engine.profile import ProfileError, load_profile

    with pytest.raises(ProfileError, match="gradient_checkpointing"):
        load_profile(tiny_profile, ["immunize.gradient_checkpointing=true", "immunize.gradient=\"exact\""])
