"""The merge layer and UCE, in float64."""

from __future__ import annotations

import pytest
import torch

from engine.editing import closed_form_merge, merge_projector, projector, uce_edit


def _problem(seed=0, d=6, c=10, lens=(2, 3), r=30):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, c, generator=g, dtype=torch.float64)
    adapted = [w0 + 0.3 * torch.randn(d, c, generator=g, dtype=torch.float64) for _ in lens]
    concepts = [torch.randn(l, c, generator=g, dtype=torch.float64) for l in lens]
    reg = torch.randn(r, c, generator=g, dtype=torch.float64)
    return w0, adapted, concepts, reg


def test_exact_constraint_and_kkt():
    w0, adapted, concepts, reg = _problem()
    w = closed_form_merge(w0, adapted, concepts, reg, ridge=0.0)
    c = torch.cat(concepts)
    o = torch.cat([cn @ wn.T for cn, wn in zip(concepts, adapted)])
    assert ((c @ w.T - o).norm() / o.norm()) < 1e-8
    # direct KKT solve: [2R C^T; C 0] [W^T; L] = [2R W0^T; O]
    r = reg.T @ reg
    m, cdim = c.shape
    kkt = torch.zeros(cdim + m, cdim + m, dtype=torch.float64)
    kkt[:cdim, :cdim] = 2 * r
    kkt[:cdim, cdim:] = c.T
    kkt[cdim:, :cdim] = c
    rhs = torch.cat([2 * r @ w0.T, o])
    w_kkt = torch.linalg.solve(kkt, rhs)[:cdim].T
    torch.testing.assert_close(w, w_kkt, rtol=1e-8, atol=1e-10)


def test_ridge_keeps_constraint_and_mu_relaxes_it():
    w0, adapted, concepts, reg = _problem(1)
    c = torch.cat(concepts)
    o = torch.cat([cn @ wn.T for cn, wn in zip(concepts, adapted)])
    w = closed_form_merge(w0, adapted, concepts, reg, ridge=0.1)
    assert ((c @ w.T - o).norm() / o.norm()) < 1e-8
    w_mu = closed_form_merge(w0, adapted, concepts, reg, mu=0.1)
    res = (c @ w_mu.T - o).norm() / o.norm()
    assert 1e-4 < res < 1.0


def test_gradcheck():
    w0, adapted, concepts, reg = _problem(2, d=3, c=6, lens=(1, 2), r=12)
    proj = merge_projector(concepts, reg, ridge=0.01)

    def f(w0_, a1, a2):
        return proj.apply(w0_, [a1, a2])

    args = [t.clone().requires_grad_(True) for t in (w0, *adapted)]
    assert torch.autograd.gradcheck(f, args)


def test_shared_rows_are_merged_to_the_mean_target():
    w0, adapted, concepts, reg = _problem(3, lens=(3, 3))
    concepts[1][0] = concepts[0][0]  # a shared prefix row
    proj = merge_projector(concepts, reg)
    assert proj.proj.c.shape[0] == 5 and not proj.dependent
    w = proj.apply(w0, adapted)
    assert torch.isfinite(w).all()
    shared = concepts[0][0]
    want = 0.5 * (shared @ adapted[0].T + shared @ adapted[1].T)
    torch.testing.assert_close(shared @ w.T, want, rtol=1e-8, atol=1e-10)
    # the rows that are not shared are met exactly: no concept is dropped
    torch.testing.assert_close(concepts[0][1:] @ w.T, concepts[0][1:] @ adapted[0].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(concepts[1][1:] @ w.T, concepts[1][1:] @ adapted[1].T, rtol=1e-8, atol=1e-10)


def test_more_rows_than_width_is_finite_least_squares():
    w0, adapted, concepts, reg = _problem(4, c=5, lens=(4, 4))
    proj = merge_projector(concepts, reg)
    assert proj.dependent
    w = proj.apply(w0, adapted)
    assert torch.isfinite(w).all()
    # least squares: the residual is orthogonal to the row space's achievable directions (normal equations)
    c = proj.proj.c
    o = proj.proj.average @ proj.targets(adapted)
    w_ls = torch.linalg.lstsq(c, o).solution.T  # W minimising ||C W^T - O|| (full column rank here)
    torch.testing.assert_close(c @ w.T, c @ w_ls.T, rtol=1e-6, atol=1e-8)
    # both concepts still pull the result: dropping one would change it
    w_one = merge_projector(concepts[:1], reg).apply(w0, adapted[:1])
    assert (w - w_one).norm() > 1e-3


def test_projector_is_shared_across_layers():
    w0, adapted, concepts, reg = _problem(5)
    proj = merge_projector(concepts, reg, ridge=0.01)
    for scale in (1.0, 3.0):
        w = proj.apply(scale * w0, [scale * a for a in adapted])
        torch.testing.assert_close(w, closed_form_merge(scale * w0, [scale * a for a in adapted], concepts, reg, 0.01))


def _tiny_pipe():
    from engine.testbed.build import TINY, build_random_pipeline

    return build_random_pipeline(TINY, seed=0)


def _kv_outputs(pipe, prompts):
    from engine.diffusion import concept_rows
    from engine.models import kv_layer_names

    params = dict(pipe.unet.named_parameters())
    rows = torch.cat([concept_rows(pipe.text_encoder, pipe.tokenizer, p) for p in prompts]).double()
    return {k: rows @ params[k].detach().double().T for k in kv_layer_names(pipe.unet)}


def test_uce_preserves_and_erases_within_half_width():
    pipe = _tiny_pipe()
    erase, preserve = ["an artwork of strieker"], ["a photo of a star", "an artwork of ringo"]
    before = _kv_outputs(pipe, preserve)
    from engine.editing import aligned_rows

    e_rows, t_rows = aligned_rows(pipe.text_encoder, pipe.tokenizer, erase[0], "")
    params = dict(pipe.unet.named_parameters())
    targets = {k: t_rows.double() @ params[k].detach().double().T for k in before}
    report = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, erase, preserve)
    assert report.erased_rows + report.preserved_rows <= report.width // 2 and not report.dependent
    after = _kv_outputs(pipe, preserve)
    for k in before:
        assert float((after[k] - before[k]).norm() / before[k].norm()) < 1e-4
    assert report.preserve_drift < 1e-4
    # erased rows not shared with a preserved prompt now output the empty prompt's aligned rows
    from engine.diffusion import concept_rows

    pres_rows = torch.cat([concept_rows(pipe.text_encoder, pipe.tokenizer, p) for p in preserve])
    own = torch.cdist(e_rows, pres_rows).min(1).values > 1e-5
    assert own.sum() >= 2  # the name's rows and EOS
    params = dict(pipe.unet.named_parameters())
    for k, tgt in targets.items():
        out = e_rows[own].double() @ params[k].detach().double().T
        assert float((out - tgt[own]).norm() / tgt[own].norm()) < 1e-4


def test_uce_beyond_the_width_reports_drift():
    pipe = _tiny_pipe()
    words = ["star", "heart", "moon", "cross", "arrow", "house", "tree", "fish"]
    preserve = [f"a photo of a {w}" for w in words] + [f"an artwork of {w}" for w in words]
    report = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, ["an artwork of strieker"], preserve)
    assert report.erased_rows + report.preserved_rows > report.width
    assert report.dependent
    assert 0 < report.preserve_drift < float("inf")
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_uce_with_padding_also_erases_the_positions_after_eos():
    """A causal text encoder carries the prompt into the padding positions the UNet attends to: ``padding=True``
    edits those rows too (the erased prompt's padding rows then output the empty prompt's), ``False`` leaves them."""
    from engine.diffusion import encode_prompts, eos_index
    from engine.models import kv_layer_names

    erase = "an artwork of strieker"
    results = {}
    for padding in (False, True):
        pipe = _tiny_pipe()
        emb = encode_prompts(pipe.text_encoder, pipe.tokenizer, [erase, ""]).double()
        end = eos_index(pipe.tokenizer, erase) + 1
        pad, pad_target = emb[0, end:], emb[1, end:]
        params = dict(pipe.unet.named_parameters())
        k = kv_layer_names(pipe.unet)[0]
        want = pad_target @ params[k].detach().double().T
        uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, [erase], ["a photo of a star"], padding=padding)
        got = pad @ params[k].detach().double().T
        results[padding] = float((got - want).norm() / want.norm())
    assert results[True] < 1e-3 < results[False]
