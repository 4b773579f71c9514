"""The selective-immunization terms of the upper level: the preservation term (distance of the model's noise
predictions on kept prompts to the parent's) and the bounded ascents, against the unrolled objective written out
independently (float64, tiny UNet), and in a real 2-step immunization."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from engine.editing import discriminative_basis, merge_projector
from engine.immunize.core import BiLevel, Preserve, ascended, make_merge_fn
from test_immunize_core import ALPHA, W_PRIOR, _rel, fixed_batch, problem, scheduler, unrolled_gradient

WEIGHT = 2.5


def parent_of(unet, upper):
    """S^u of a parent that differs from theta (as after some outer steps), so the term at theta is not zero."""
    g = torch.Generator().manual_seed(3)
    return {k: (p.detach() + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)).clone()
            for k, p in unet.named_parameters() if k in upper}


def preserve_term(keep, parent, at):
    def extra(unet, sched, theta, merged):
        xt = sched.add_noise(keep.latents, keep.noise, keep.timesteps)

        def pred(params):
            return functional_call(unet, params, (xt, keep.timesteps), {"encoder_hidden_states": keep.context}).sample

        target = pred({**theta, **parent}).detach()
        points = [merged, theta] if at == "both" else [merged]
        return -WEIGHT * sum(((pred(p) - target) ** 2).mean() for p in points)
    return extra


def core_gradient(mode, preserve=None, keep=None, ascent="loss", cap=1.0):
    unet, lower, upper, kv, rows, reg, tasks = problem()
    proj = merge_projector(rows, reg, ridge=0.01)
    core = BiLevel(unet, scheduler(), lower, upper, ALPHA, W_PRIOR, mode, 1e-4, make_merge_fn(proj, kv),
                   preserve=preserve(unet, upper) if callable(preserve) else preserve, ascent=ascent, ascent_cap=cap)
    grads, stats = core.meta_gradient(tasks, keep=keep)
    return torch.cat([grads[k].flatten() for k in upper]), stats


def reference(extra=None, ascend=lambda li: li):
    unet, lower, upper, kv, rows, reg, tasks = problem()
    return unrolled_gradient(unet, lower, upper, kv, rows, reg, tasks, ascend=ascend, extra=extra)[0]


@pytest.mark.parametrize("at", ["both", "merged"])
def test_preservation_term_is_the_unrolled_one(at):
    keep = fixed_batch(40, n_inst=3, n_prior=0)
    unet, _, upper, *_ = problem()
    parent = parent_of(unet, upper)
    want = reference(preserve_term(keep, parent, at))
    exact, stats = core_gradient("exact", lambda u, up: Preserve(WEIGHT, parent, at), keep)
    assert _rel(exact, want) < 1e-6 and stats.preserve_loss > 0
    fd, _ = core_gradient("fd", lambda u, up: Preserve(WEIGHT, parent, at), keep)
    assert _rel(fd, want) < 1e-4
    plain = reference()
    assert _rel(want, plain) > 1e-2  # the term changes the gradient: switched off, the test above fails
    off, _ = core_gradient("exact", lambda u, up: Preserve(0.0, parent, at), keep)
    assert _rel(off, plain) < 1e-6


def test_preservation_is_zero_at_the_parent_without_adaptation():
    """At theta = the parent and no inner step, the predictions are the parent's: no loss, no push."""
    keep = fixed_batch(40, n_inst=3, n_prior=0)
    unet, lower, upper, kv, rows, reg, tasks = problem()
    parent = {k: p.detach().clone() for k, p in unet.named_parameters() if k in upper}
    core = BiLevel(unet, scheduler(), lower, upper, 0.0, W_PRIOR, "exact",
                   merge_fn=make_merge_fn(merge_projector(rows, reg, ridge=0.01), kv),
                   preserve=Preserve(WEIGHT, parent, "both"))
    _, stats = core.meta_gradient(tasks, keep=keep)
    assert stats.preserve_loss == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("ascent", ["log", "capped"])
def test_bounded_ascents_are_the_unrolled_ones(ascent):
    plain, stats = core_gradient("exact")
    per_task = stats.outer_loss / 2
    cap = per_task * 0.9 if ascent == "capped" else 1.0  # one of the two tasks' losses is above the cap
    want = reference(ascend=lambda li: ascended(li, ascent, cap))
    got, _ = core_gradient("exact", ascent=ascent, cap=cap)
    assert _rel(got, want) < 1e-6 and _rel(got, plain) > 1e-2
    fd, _ = core_gradient("fd", ascent=ascent, cap=cap)
    assert _rel(fd, want) < 1e-4


def test_a_cap_below_every_loss_leaves_only_the_prior_term():
    got, stats = core_gradient("exact", ascent="capped", cap=1e-6)
    want = reference(ascend=lambda li: li * 0)
    assert _rel(got, want) < 1e-6


def test_unknown_ascent_is_refused():
    unet, lower, upper, *_ = problem()
    with pytest.raises(ValueError, match="unknown ascent"):
        BiLevel(unet, scheduler(), lower, upper, ALPHA, W_PRIOR, "exact", ascent="hinge")


def test_immunization_with_preservation_logs_its_loss(tiny_profile, tmp_path):
    from engine.immunize.runner import immunize, keep_prompts
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.preserve_weight=1.0", "immunize.steps=2", "utility.enabled=false",
                                    "erase.method=\"none\"", "immunize.ascent=\"capped\""])
    grp = p.group("g2")
    prompts = keep_prompts(p, list(grp.others))
    assert prompts[:2] == ["an artwork of ringo", "an artwork of cellini"] and len(prompts) == 2 + 20
    run = immunize(p, runs_dir=tmp_path / "runs", group="g2", method="mima", profile_name="tiny")
    events = [json.loads(line) for line in (run / "events.jsonl").open()]
    losses = [e["value"] for e in events if e["name"] == "preserve_loss"]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    only = load_profile(tiny_profile, ["immunize.preserve_prompts=\"others\""])
    assert keep_prompts(only, list(only.group("g2").others)) == ["an artwork of ringo", "an artwork of cellini"]


def test_discriminative_basis_finds_the_targets_own_directions():
    g = torch.Generator().manual_seed(0)
    keep = torch.zeros(50, 6)
    keep[:, :3] = torch.randn(50, 3, generator=g)
    target = torch.randn(20, 6, generator=g)  # shares the kept directions and has its own (dims 3..5)
    q = discriminative_basis(target, [keep], rank=2, ridge=1e-6)
    assert q.shape == (6, 2) and torch.allclose(q.T @ q, torch.eye(2), atol=1e-5)
    assert float((keep @ q).norm() / keep.norm()) < 1e-3  # nothing of the kept rows in the plane
    assert float((target @ q).norm() / target.norm()) > 0.3
    with pytest.raises(ValueError, match="rank"):
        discriminative_basis(target, [keep], rank=7)


def test_a_few_kept_rows_count_as_much_as_many():
    """Five rows along dim 3 beside 500 along dims 0..2: flat, dim 3 would be nearly free; as a block of its own it
    is kept."""
    g = torch.Generator().manual_seed(1)
    many = torch.zeros(500, 6)
    many[:, :3] = torch.randn(500, 3, generator=g)
    few = torch.zeros(5, 6)
    few[:, 3] = 1.0
    target = torch.randn(40, 6, generator=g)
    balanced = discriminative_basis(target, [many, few], rank=2, ridge=1e-3)
    flat = discriminative_basis(target, [torch.cat([many, few])], rank=2, ridge=1e-3)
    assert float((few @ balanced).norm() / few.norm()) < 0.5 * float((few @ flat).norm() / few.norm())


def _kv_change(tiny_profile, tmp_path, subspace):
    """Per k/v layer: the change of the kept prompts' keys/values and of the targets', relative to the parent's, and
    the rank of the weight change, after a 2-step immunization."""
    from safetensors.torch import load_file

    from engine.diffusion import encode_prompts
    from engine.immunize.runner import immunize, keep_prompts
    from engine.models import kv_layer_names, load_pipeline
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.steps=2", "utility.enabled=false", "erase.method=\"none\"",
                                    "immunize.upper=\"xattn-kv\"", "immunize.outer_lr=0.01",
                                    f"immunize.subspace=\"{subspace}\"", "immunize.subspace_rank=2"])
    grp = p.group("g2")
    run = immunize(p, runs_dir=tmp_path / subspace, group="g2", method="mima", profile_name="tiny")
    pipe = load_pipeline(p.model.base, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        kept = encode_prompts(pipe.text_encoder, pipe.tokenizer, keep_prompts(p, list(grp.others))).flatten(0, 1)
        targets = encode_prompts(pipe.text_encoder, pipe.tokenizer, [c.prompt for c in grp.targets]).flatten(0, 1)
    changed = load_file(next((run / "checkpoints").glob("step-*")) / "unet_changed.safetensors")
    params = dict(pipe.unet.named_parameters())
    out = []
    for k in kv_layer_names(pipe.unet):
        w0, dw = params[k].detach(), changed[k] - params[k].detach()
        out.append((float((kept @ dw.T).norm() / (kept @ w0.T).norm()),
                    float((targets @ dw.T).norm() / (targets @ w0.T).norm()), int(torch.linalg.matrix_rank(dw))))
    return out


def test_target_subspace_moves_the_targets_keys_and_keeps_the_others(tiny_profile, tmp_path):
    restricted = _kv_change(tiny_profile, tmp_path, "target")
    free = _kv_change(tiny_profile, tmp_path, "all")
    assert all(rank <= 2 for *_, rank in restricted) and any(rank > 2 for *_, rank in free)
    assert all(t > 0 for _, t, _ in restricted)
    assert sum(k for k, _, _ in restricted) / sum(t for _, t, _ in restricted) < 0.5
    assert sum(k for k, _, _ in restricted) < 0.5 * sum(k for k, _, _ in free)



def test_several_inner_steps_need_first_order_before_any_run(tiny_profile, tmp_path):
    from engine.immunize.runner import ImmunizationUsageError, immunize
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.steps=1", "utility.enabled=false", "erase.method=\"none\"",
                                    "immunize.inner_steps=3", "immunize.gradient=\"fd\""])
    with pytest.raises(ImmunizationUsageError, match="inner_steps = 3 needs immunize.gradient"):
        immunize(p, runs_dir=tmp_path / "runs", group="g2", method="mima", profile_name="tiny")
    assert not list((tmp_path / "runs").glob("*-immunize-*"))
    q = load_profile(tiny_profile, ["immunize.steps=2", "utility.enabled=false", "erase.method=\"none\"",
                                    "immunize.inner_steps=3", "immunize.gradient=\"first-order\""])
    run = immunize(q, runs_dir=tmp_path / "runs", group="g2", method="mima", profile_name="tiny")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_a_preset_fills_only_the_keys_a_profile_leaves_out(tiny_profile):
    from engine.profile import load_profile

    paper = load_profile(tiny_profile, []).immunize
    selective = load_profile(tiny_profile, ["immunize.preset=\"selective\""]).immunize
    assert (paper.preset, paper.subspace, paper.upper_set) == ("paper", "all", "xattn")
    assert (selective.subspace, selective.upper_set, selective.subspace_rank) == ("target", "xattn-kv", 4)
    assert selective.preserve_weight > 0
    own = load_profile(tiny_profile, ["immunize.preset=\"selective\"", "immunize.subspace=\"all\""]).immunize
    assert (own.subspace, own.upper_set) == ("all", "xattn-kv")
    # a run records the values the preset gave, so it reads the same if a preset's definition changes
    assert selective.model_dump()["subspace"] == "target"


def test_an_unknown_preset_names_the_field(tiny_profile):
    from engine.profile import ProfileError, load_profile

    with pytest.raises(ProfileError, match="immunize.preset"):
        load_profile(tiny_profile, ["immunize.preset=\"strong\""])


def _changed_weights(tiny_profile, runs, extra):
    from safetensors.torch import load_file

    from engine.immunize.runner import immunize
    from engine.profile import load_profile

    p = load_profile(tiny_profile, ["immunize.steps=2", "utility.enabled=false", "erase.method=\"none\"",
                                    "immunize.inner_lr=1e-3", *extra])
    run = immunize(p, runs_dir=runs, group="g2", method="mima", profile_name="tiny")
    return run, load_file(next((run / "checkpoints").glob("step-*")) / "unet_changed.safetensors")


def test_sampled_inner_lr_is_drawn_per_step_and_used(tiny_profile, tmp_path):
    """``inner_lr_max``: each outer step draws α log-uniformly from [inner_lr, inner_lr_max], a pure function of
    (seed, step); the step uses the drawn α (a one-point range is the fixed α, bit for bit; a wide range changes the
    weights) and the run logs it."""
    from engine.immunize.runner import inner_lr_at
    from engine.profile import ProfileError, load_profile
    from engine.runs import RunReader

    s = load_profile(tiny_profile, ["immunize.inner_lr=1e-3", "immunize.inner_lr_max=1e-1"]).immunize
    draws = [inner_lr_at(s, 0, k) for k in range(1, 41)]
    assert all(1e-3 <= a <= 1e-1 for a in draws) and len(set(draws)) == 40
    assert draws == [inner_lr_at(s, 0, k) for k in range(1, 41)]  # a resumed run draws the same
    assert 0.25 < sum(a < 1e-2 for a in draws) / 40 < 0.75  # log-uniform: half below the geometric mean
    assert inner_lr_at(load_profile(tiny_profile, ["immunize.inner_lr=1e-3"]).immunize, 0, 7) == 1e-3

    _, fixed = _changed_weights(tiny_profile, tmp_path / "fixed", [])
    _, point = _changed_weights(tiny_profile, tmp_path / "point", ["immunize.inner_lr_max=1e-3"])
    run, wide = _changed_weights(tiny_profile, tmp_path / "wide", ["immunize.inner_lr_max=1e-1"])
    assert all(torch.equal(fixed[k], point[k]) for k in fixed)
    assert any(not torch.allclose(fixed[k], wide[k]) for k in fixed)
    logged = {e["step"]: e["value"] for e in RunReader(run).events("scalar") if e["name"] == "inner_lr"}
    assert logged == pytest.approx({1: draws[0], 2: draws[1]})

    with pytest.raises(ProfileError, match="inner_lr_max"):
        load_profile(tiny_profile, ["immunize.inner_lr=1e-3", "immunize.inner_lr_max=1e-4"])
