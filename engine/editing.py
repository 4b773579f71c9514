"""Closed-form edits of the cross-attention key/value projections: MIMA's merge layer and UCE erasure.

Layout: a PyTorch ``Linear`` weight is ``W in R^{d x c}`` (out x in); text token embeddings are rows ``C in R^{m x c}``.

**Merge (Eq. 2/5 of MIMA, Custom Diffusion's constrained least squares).** Given the anchor ``W0``, adapted copies
``W_n`` and concept rows ``C_n``, solve ``min_W ||C_reg W^T - C_reg W0^T||^2 + lam ||W - W0||^2`` s.t. ``C W^T = O``,
``O = [C_1 W_1^T; ...; C_N W_N^T]``. With ``R = C_reg^T C_reg + lam I``, ``G = C R^-1 C^T`` and
``P = (G + mu I)^-1 C R^-1``:

    W* = W0 + (O^T - W0 C^T) P

``P`` depends on the embeddings only, so :func:`merge_projector` computes it once (per run, with a frozen text encoder)
and :meth:`MergeProjector.apply` merges each k/v layer; ``W*`` is affine in ``W0`` and every ``W_n``, so autograd
differentiates it exactly. Ridges are relative: ``lam = ridge * tr(C_reg^T C_reg) / c``, ``mu = mu_r * tr(G) / m``.

*Shared and dependent rows.* Rows of ``C`` that are numerically identical (common prompt prefixes such as
"an artwork of" give identical rows in a causal text encoder) are merged into one constraint whose target is the
mean of their targets: the least-squares compromise between the concepts that share it. If the remaining rows are
still dependent (or ``m > c``), ``G`` is singular; we then use its pseudo-inverse, which gives the minimum-norm
least-squares solution of the constraints. Every concept keeps its rows in the system — none is silently dropped —
and the result is always finite. :attr:`MergeProjector.dependent` records when that fallback was taken.

**UCE (Gandikota et al., WACV 2024).** For every cross-attention k/v weight ``W`` the erased rows ``c_e`` must output
what the neutral target's aligned rows ``c*_e`` output (``v_e = W c*_e``) and the preserved rows ``c_p`` must keep their
outputs. UCE's closed form ``W' = (sum s v c^T + lam W)(sum s c c^T + lam I)^-1`` is, in the limit of large scales, the
smallest change of ``W`` meeting those equalities; :func:`uce_edit` solves it with the merge's :func:`projector`
(``R = I``), exact for independent rows, least squares beyond, and UCE's penalised form for ``lamb > 0``.
*Row alignment:* the erased prompt's rows after BOS up to and including its EOS (positions ``1..l``) are paired
position by position with the target prompt's embedding at the same positions; for the default empty target that is
its EOS followed by its padding rows, which is what the model sees for an empty prompt. Preserved prompts contribute
their rows after BOS through EOS with their current outputs as targets; an erased row identical to a preserved row
(a common prefix such as "an artwork of" in a causal text encoder) is preserved, not erased. When erased + preserved rows are independent
(e.g. ``<= c/2``) preserved outputs are kept to rounding; beyond that :class:`UCEReport` reports the drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _sym_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (Cholesky; LU if that fails)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


def unique_rows(c: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Group numerically identical rows: returns ``(C_u [m_u, c], A [m_u, m])`` with ``A`` the averaging matrix that
    maps per-row targets to per-unique-row targets (``A @ C == C_u``)."""
    m = c.shape[0]
    scale = c.abs().amax().clamp_min(1e-30)
    groups: list[list[int]] = []
    reps: list[torch.Tensor] = []
    for i in range(m):
        for g, rep in zip(groups, reps):
            if torch.allclose(c[i], rep, rtol=0, atol=float(rtol * scale)):
                g.append(i)
                break
        else:
            groups.append([i])
            reps.append(c[i])
    a = torch.zeros(len(groups), m, dtype=c.dtype, device=c.device)
    for k, g in enumerate(groups):
        a[k, g] = 1.0 / len(g)
    return a @ c, a


@dataclass
class Projector:
    """``P = (G + mu I)^+ C R^-1`` for fixed rows ``C``; :meth:`solve` gives ``W0 + (O^T - W0 C^T) P``."""

    c: torch.Tensor  # unique rows [m_u, c]
    p: torch.Tensor  # [m_u, c]
    average: torch.Tensor  # [m_u, m]: per-row targets -> per-unique-row targets (mean over identical rows)
    dependent: bool  # the pseudo-inverse (least-squares) fallback was used
    lam: float
    mu: float

    def solve(self, w0: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The edited weight for targets ``o [m, d]`` (one per original row); differentiable in ``w0`` and ``o``."""
        dt = w0.dtype
        o_u = self.average.to(dt) @ o.to(dt)
        return w0 + (o_u.T - w0 @ self.c.to(dt).T) @ self.p.to(dt)

    def residual(self, w: torch.Tensor, o: torch.Tensor) -> float:
        """Relative constraint residual ``||C W^T - O|| / ||O||`` over the unique rows (0 when exact)."""
        o_u = self.average.to(w.dtype) @ o.to(w.dtype)
        return float((self.c.to(w.dtype) @ w.T - o_u).norm() / o_u.norm().clamp_min(1e-30))


def projector(rows: torch.Tensor, reg: torch.Tensor | None = None, ridge: float = 0.0, mu: float = 0.0,
              rtol: float = 1e-6) -> Projector:
    """Build :class:`Projector` for constraint rows ``[m, c]`` and regulariser rows ``reg [r, c]`` (None: ``R = I``,
    i.e. the edit is the smallest change of ``W`` in Frobenius norm)."""
    rows = rows.detach()
    dt = torch.float64 if rows.dtype == torch.float64 else torch.float32
    rows = rows.to(dt)
    cdim, dev = rows.shape[1], rows.device
    cu, avg = unique_rows(rows, rtol)
    eye = torch.eye(cdim, dtype=dt, device=dev)
    r = reg.detach().to(dev, dt).T @ reg.detach().to(dev, dt) if reg is not None else eye.clone()
    lam = ridge * float(torch.trace(r)) / cdim
    x = _sym_solve(r + lam * eye, cu.T)  # R^-1 C^T  [c, m_u]
    g = cu @ x
    g = (g + g.T) / 2
    m = g.shape[0]
    mu_abs = mu * float(torch.trace(g)) / m
    eig = torch.linalg.eigvalsh(g)
    top = eig.abs().max().clamp_min(1e-300)
    tol = top * max(m, cdim) * torch.finfo(dt).eps * 10
    dependent = bool(mu_abs == 0 and (m > cdim or eig.min() <= tol))
    if dependent:
        p = torch.linalg.pinv(g, hermitian=True, rtol=float(tol / top)) @ x.T
    else:
        p = _sym_solve(g + mu_abs * torch.eye(m, dtype=dt, device=dev), x.T)
    return Projector(c=cu, p=p, average=avg, dependent=dependent, lam=lam, mu=mu_abs)


@dataclass
class MergeProjector:
    """The merge of N concepts: a :class:`Projector` over their stacked rows ``C = [C_1; ...; C_N]``."""

    proj: Projector
    concept_rows: list[torch.Tensor]  # C_n [l_n, c]

    @property
    def dependent(self) -> bool:
        return self.proj.dependent

    def targets(self, adapted: Sequence[torch.Tensor]) -> torch.Tensor:
        """``O = [C_1 W_1^T; ...; C_N W_N^T]`` (``[m, d]``)."""
        if len(adapted) != len(self.concept_rows):
            raise ValueError(f"{len(adapted)} adapted weights for {len(self.concept_rows)} concepts")
        return torch.cat([c.to(w.device, w.dtype) @ w.T for c, w in zip(self.concept_rows, adapted)])

    def apply(self, w0: torch.Tensor, adapted: Sequence[torch.Tensor]) -> torch.Tensor:
        """``W* = W0 + (O^T - W0 C^T) P`` for one layer (differentiable in ``w0`` and every ``adapted[n]``)."""
        return self.proj.solve(w0, self.targets(adapted))

    def residual(self, merged: torch.Tensor, adapted: Sequence[torch.Tensor]) -> float:
        return self.proj.residual(merged, self.targets(adapted))


def merge_projector(concept_embeddings: Sequence[torch.Tensor], reg_embeddings: torch.Tensor, ridge: float = 0.0,
                    mu: float = 0.0, rtol: float = 1e-6) -> MergeProjector:
    """Compute ``P`` once from the concept rows ``C_n [l_n, c]`` and the regulariser rows ``C_reg [r, c]``."""
    rows = [e.detach() for e in concept_embeddings]
    return MergeProjector(projector(torch.cat(rows), reg_embeddings, ridge, mu, rtol), rows)


def closed_form_merge(w0: torch.Tensor, adapted: Sequence[torch.Tensor], concept_embeddings: Sequence[torch.Tensor],
                      reg_embeddings: torch.Tensor, ridge: float = 0.0, mu: float = 0.0) -> torch.Tensor:
    """The merged ``[d, c]`` weight of one k/v layer (see the module docstring); differentiable in ``w0`` and
    every ``adapted[n]``."""
    return merge_projector(concept_embeddings, reg_embeddings, ridge, mu).apply(w0, adapted)


def discriminative_basis(target_rows: torch.Tensor, keep_rows: Sequence[torch.Tensor], rank: int,
                         ridge: float = 1e-2) -> torch.Tensor:
    """An orthonormal ``[c, rank]`` basis of the text-embedding directions that carry the most of ``target_rows``
    ``[n, c]`` per unit of the kept rows: the top generalised eigenvectors of the pair of second moments
    ``(T, K + ridge * tr(K)/c * I)``. ``keep_rows``: blocks of kept rows ``[m_i, c]`` (e.g. the other concepts'
    prompts, the generic captions); ``K`` is the mean of the blocks' second moments, each normalised to unit trace, so
    a few kept prompts are not outweighed by many captions. A k/v weight changed only as ``dW = G Q Q^T`` moves the
    targets' keys and values and leaves the kept prompts' nearly as they were."""
    dt = torch.float64
    t = target_rows.detach().to(dt)
    c = t.shape[1]
    if not 1 <= rank <= c:
        raise ValueError(f"rank {rank} outside 1..{c}")
    eye = torch.eye(c, dtype=dt, device=t.device)
    blocks = [b.detach().to(t.device, dt) for b in keep_rows if len(b)]
    km = sum((m := b.T @ b) / torch.trace(m) for b in blocks) / len(blocks)
    km = km + ridge * float(torch.trace(km)) / c * eye
    inv = torch.linalg.solve_triangular(torch.linalg.cholesky(km), eye, upper=False)
    _, vecs = torch.linalg.eigh(inv @ (t.T @ t / len(t)) @ inv.T)  # ascending
    q, _ = torch.linalg.qr(inv.T @ vecs[:, -rank:].flip(1))
    return q.to(target_rows.dtype)


# ------------------------------------------------------------------------------------------------ UCE


@dataclass
class UCEReport:
    layers: int
    erased_rows: int
    preserved_rows: int
    width: int
    dependent: bool  # rows were dependent or more than the width: least-squares compromise
    preserve_drift: float  # max relative change of preserved outputs over all layers
    erase_residual: float  # max relative distance of erased outputs to their targets


def aligned_rows(text_encoder, tokenizer, prompt: str, target: str, padding: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The erased prompt's rows after BOS through EOS (``padding``: through the last padding position too) and the
    target's rows at the same positions."""
    from .diffusion import encode_prompts, eos_index

    emb = encode_prompts(text_encoder, tokenizer, [prompt, target])
    end = emb.shape[1] if padding else eos_index(tokenizer, prompt) + 1
    return emb[0, 1:end], emb[1, 1:end]


@torch.no_grad()
def uce_edit(unet, text_encoder, tokenizer, erase: Sequence[str], preserve: Sequence[str] = (), target: str = "",
             lamb: float = 0.0, erase_scale: float = 1.0, preserve_scale: float = 1.0, padding: bool = False
             ) -> UCEReport:
    """Erase the concept prompts ``erase`` from every ``attn2.to_k``/``attn2.to_v`` of ``unet``, in place.

    The edit is the smallest change of each weight (Frobenius) such that erased rows output what their aligned
    target rows output and preserved rows keep their outputs: UCE's closed form in the limit of large erase and
    preserve scales, solved by the merge's :func:`projector` (``R = I``). ``lamb > 0`` (relative, like ``mu``)
    gives UCE's penalised form ``lamb ||W - W_old||^2 + sum_e s_e ||W c_e - v_e||^2 + s_p sum_p ||W c_p - W_old c_p||^2``,
    where the scales weight the rows. ``padding``: the rows of the padding positions after EOS are edited too (a
    causal text encoder carries the prompt there as well, and the UNet attends to every position).
    """
    from .models import kv_layer_names

    pairs = [aligned_rows(text_encoder, tokenizer, p, target, padding) for p in erase]
    ce = torch.cat([a for a, _ in pairs]).double()
    ct = torch.cat([b for _, b in pairs]).double()
    cp_list = [aligned_rows(text_encoder, tokenizer, p, p, padding)[0].double() for p in preserve]
    cp = torch.cat(cp_list) if cp_list else ce.new_zeros(0, ce.shape[1])
    if cp.numel():  # a row a preserved prompt also has (a shared prefix like "an artwork of") is preserved
        scale = float(torch.cat([ce, cp]).abs().max())
        shared = (torch.cdist(ce, cp).min(dim=1).values <= 1e-6 * scale)
        ce, ct = ce[~shared], ct[~shared]
    se, sp = erase_scale**0.5, preserve_scale**0.5
    rows = torch.cat([se * ce, sp * cp])
    proj = projector(rows, None, 0.0, lamb)
    params = dict(unet.named_parameters())
    drift, resid = 0.0, 0.0
    names = kv_layer_names(unet)
    for name in names:
        w = params[name]
        w64 = w.detach().to(rows.device, torch.float64)
        o = torch.cat([se * (ct @ w64.T), sp * (cp @ w64.T)])
        new = proj.solve(w64, o)
        if cp.numel():
            before = cp @ w64.T
            drift = max(drift, float((cp @ new.T - before).norm() / before.norm().clamp_min(1e-30)))
        tgt = ct @ w64.T
        resid = max(resid, float((ce @ new.T - tgt).norm() / tgt.norm().clamp_min(1e-30)))
        w.copy_(new.to(w.device, w.dtype))
    return UCEReport(layers=len(names), erased_rows=ce.shape[0], preserved_rows=cp.shape[0], width=ce.shape[1],
                     dependent=proj.dependent, preserve_drift=drift, erase_residual=resid)
