"""The sections of a profile besides its concepts and groups: ``[model]``, ``[erase]``, ``[regularization]``,
``[immunize]``, ``[attack]``, ``[eval]`` and ``[utility]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from .captions import default_captions_path
from .concepts import FolderImages, GenerateImages, ImageSet, RenderImages, _Strict
from .errors import ProfileError

__all__ = ["ModelSection", "EraseSection", "RegularizationSection", "MergeSettings", "IMMUNIZE_PRESETS", "ImmunizeSection",
           "AttackMethod", "AttackOverride", "AttackSettings", "AttackSection", "EvalSection", "UtilitySection"]


class ModelSection(_Strict):
    """``[model]``: the model every job starts from."""

    base: str = Field(default="testbed", min_length=1)
    """A diffusers hub id (``CompVis/stable-diffusion-v1-4``), a local diffusers folder, or ``testbed``."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    seed: int = 0
    sample_steps: int = Field(default=50, ge=1)
    """Denoising steps whenever images are sampled (image sets, samples, evaluation)."""
    guidance: float = Field(default=7.5, ge=0.0)
    """Classifier-free guidance scale whenever images are sampled."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
        return value


# ------------------------------------------------------------------------------------------- erase


class EraseSection(_Strict):
    """``[erase]``: closed-form concept erasure (UCE) of the base model before immunization."""

    method: Literal["none", "uce"] = "none"
    concepts: list[str] = Field(default_factory=list)
    """Concepts to erase; empty = the target concepts of the group being run."""
    preserve: list[str] = Field(default_factory=list)
    """Prompts whose cross-attention outputs the edit preserves, less the erased ones; empty = every concept's prompt."""
    target: str = ""
    """Prompt the erased concepts are mapped to (``""`` = the empty prompt)."""
    lamb: float = Field(default=0.1, ge=0.0)
    erase_scale: float = Field(default=1.0, ge=0.0)
    preserve_scale: float = Field(default=1.0, ge=0.0)
    padding: bool = False
    """Also edit the rows of the padding positions after EOS: a causal text encoder carries the prompt there too, and
    the UNet attends to every position (False = UCE's own edit of the prompt's tokens through EOS)."""


# ---------------------------------------------------------------------------------- regularization


class RegularizationSection(_Strict):
    """``[regularization]``: prior-preservation images and the captions of the merge regulariser."""

    images: ImageSet = Field(default_factory=lambda: GenerateImages(count=200, seed=0))
    """Per class prompt. A generate spec without prompt uses each concept's ``class_prompt``; a folder
    may contain ``{class_prompt}``, replaced by it."""
    captions: str | None = None
    """Caption file, one per line (None = the generic captions shipped in ``engine/data/captions.txt``)."""
    n_captions: int = Field(default=200, ge=1)
    """How many captions to sample (seeded by ``model.seed``) for the merge regulariser ``C_reg``."""

    def captions_path(self) -> Path:
        return Path(self.captions) if self.captions else default_captions_path()

    def images_for(self, class_prompt: str) -> FolderImages | GenerateImages | RenderImages:
        """The regularisation image set of one class prompt."""
        images = self.images
        if isinstance(images, GenerateImages) and images.prompt is None:
            return images.model_copy(update={"prompt": class_prompt})
        if isinstance(images, FolderImages):
            return images.model_copy(update={"folder": images.folder.format(class_prompt=class_prompt)})
        return images


# ----------------------------------------------------------------------------------------- immunize


class MergeSettings(_Strict):
    """``[immunize.merge]``: the closed-form merge of per-concept k/v weights (docs/method.md, Eq. 2/5)."""

    anchor: Literal["current", "pretrained"] = "current"
    """``W⁰``: the k/v of the model being immunized (current) or of the model it started from."""
    ridge: float = Field(default=1e-2, ge=0.0)
    """λ relative to the data: λ = ridge · tr(C_regᵀC_reg) / c."""
    mu: float = Field(default=0.0, ge=0.0)
    """μ relative to the data: μ = mu · tr(G) / m; 0 keeps the constraints exact."""


ParamSet = Literal["unet", "xattn", "xattn-kv"]

IMMUNIZE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "selective": {"upper": "xattn-kv", "subspace": "target", "subspace_rank": 4, "preserve_weight": 10.0},
}
"""``[immunize] preset``: the values a preset gives the keys a profile leaves out. ``paper`` is Algorithm 1 as
published (the field defaults); ``selective`` ascends only the cross-attention k/v, along the targets' four
text-embedding directions, with the preservation term on (docs/selective.md: on the testbed it kept the others'
utility where the paper's reading destroyed it, and stopped LoRA)."""


class ImmunizeSection(_Strict):
    """``[immunize]``: the bi-level immunization (Algorithm 1) and its baselines."""

    preset: Literal["paper", "selective"] = "paper"
    """Defaults for the keys below that the profile leaves out (:data:`IMMUNIZE_PRESETS`); a key the profile sets
    wins."""
    method: Literal["mima", "jt", "cp", "imma", "alternating", "none"] = "mima"
    steps: int = Field(default=1000, ge=1)
    inner_lr: float = Field(default=1e-5, gt=0.0)
    """α: learning rate of the one-step lower-level adaptation."""
    outer_lr: float = Field(default=3e-5, gt=0.0)
    """β: learning rate of the upper-level ascent (AdamW)."""
    inner_lr_max: float | None = Field(default=None, gt=0.0)
    """None: α is ``inner_lr`` at every step. Else each outer step draws α log-uniformly from
    ``[inner_lr, inner_lr_max]`` (seeded by the step, so a resumed run draws the same), so the upper level meets
    simulated attackers of several strengths, as TAR samples its attacker's learning rate."""
    inner_steps: int = Field(default=1, ge=1)
    """Inner SGD steps of the simulated attacker on each task (one fresh batch each); more than one needs
    ``gradient = "first-order"`` (nothing is carried back through steps 2..K)."""
    batch: int = Field(default=1, ge=1)
    """Instance images per concept and step (plus one prior image per concept batch)."""
    prior_weight: float = Field(default=1.0, ge=0.0)
    lower: ParamSet | None = None
    """S^l; None = the method's default (``xattn-kv`` for cp, else ``unet``). See :attr:`lower_set`."""
    upper: ParamSet | None = None
    """S^u; None = the method's default (``xattn-kv`` for cp, else ``xattn``). See :attr:`upper_set`."""
    gradient: Literal["exact", "fd", "first-order"] = "fd"
    """Gradient through the inner step: double backward, finite-difference HVPs, or first order."""
    fd_eps: float = Field(default=1e-3, gt=0.0)
    """Finite-difference step of the Hessian-vector products (``gradient = "fd"``)."""
    fd_scheme: Literal["central", "forward"] = "central"
    """``central``: two extra passes per concept, error O(eps^2); ``forward``: one, error O(eps) (the gradient at
    theta comes with the inner step's backward pass)."""
    gradient_checkpointing: bool = False
    """Recompute each ResNet and transformer block of the UNet in the backward pass instead of keeping its
    activations (block-wise, as diffusers' ``enable_gradient_checkpointing``): less memory for one more forward per
    backward. ``fd`` and ``first-order`` only (``exact`` needs the activations for its double backward)."""
    autocast: Literal["off", "bfloat16"] = "off"
    """Run the UNet's forward and backward passes of every outer step under :func:`torch.autocast` in this dtype
    (mixed precision): the weights, gradients and AdamW state stay in ``[model] dtype`` (float32: the master weights);
    the merge, losses and updates run in it too. Less activation memory and faster matmuls on a GPU; it also runs
    on the CPU. (No float16: without loss scaling its gradients underflow.)"""
    merge: MergeSettings = Field(default_factory=MergeSettings)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam: Literal["auto", "foreach", "fused", "for-loop"] = "auto"
    """The upper AdamW's implementation: PyTorch's choice (``auto``: foreach on a GPU), one kernel per parameter
    group (``fused``), or one tensor at a time (``for-loop``). The same update up to rounding."""
    sample_every: int = Field(default=100, ge=0)
    """Log sample images every N steps (0 = never)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0 = only the final weights)."""
    resolution: int = Field(default=512, ge=8)
    imma_adaptation: Literal["unet", "xattn-kv", "lora"] = "unet"
    """IMMA's lower-level adaptation: DreamBooth (``unet``) or Custom Diffusion (``xattn-kv``); ``lora`` (a fresh
    LoRA adapter) is refused: it is not implemented yet."""
    imma_concept: str | None = None
    """IMMA immunizes one concept; None = the first target of the group."""
    preserve_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the preservation term of the upper level (0 = off, the paper's Algorithm 1): the mean squared
    distance of the model's noise predictions on ``preserve_prompts`` to the parent model's, subtracted from the
    ascended objective, so that breaking the shared weights costs what it gains."""
    preserve_prompts: Literal["others", "captions", "both"] = "both"
    """What the preservation term sees: the group's other concepts' prompts, the merge's regularisation captions
    (``[regularization]``; the utility measurement holds its own captions out), or both."""
    preserve_at: Literal["merged", "both"] = "both"
    """Where the preservation term is evaluated: at the merged adapted model theta' only, or at theta too."""
    preserve_batch: int = Field(default=4, ge=1)
    """Prompts (one noisy latent each) in the preservation batch of every outer step."""
    ascent: Literal["loss", "log", "capped"] = "loss"
    """The ascended instance loss: as is (unbounded; the paper), its log, or capped at ``ascent_cap`` (no gradient
    once a concept's loss is above it)."""
    ascent_cap: float = Field(default=1.0, gt=0.0)
    """The cap of ``ascent = "capped"`` (1.0: the loss of predicting zero noise)."""
    subspace: Literal["all", "target"] = "all"
    """Where the upper level may move the cross-attention k/v weights: anywhere (the paper), or only along the
    ``subspace_rank`` text-embedding directions that carry the most of the targets' prompt embeddings per unit of the
    kept prompts' (``preserve_prompts``), so that the kept prompts' keys and values stay as the parent's. The other
    parameters of the upper set are not restricted (``upper = "xattn-kv"`` changes nothing else)."""
    subspace_rank: int = Field(default=8, ge=1)
    """Directions of ``subspace = "target"`` (at most the text embedding's width)."""
    subspace_ridge: float = Field(default=1e-2, gt=0.0)
    """Ridge on the kept prompts' second moment (relative to its mean eigenvalue) in ``subspace = "target"``."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in IMMUNIZE_PRESETS:
            data = {**IMMUNIZE_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _inner_lr_range(self) -> "ImmunizeSection":
        if self.inner_lr_max is not None and self.inner_lr_max < self.inner_lr:
            raise ValueError(f"inner_lr_max ({self.inner_lr_max:g}) is below inner_lr ({self.inner_lr:g}): the "
                             "sampled range is [inner_lr, inner_lr_max]")
        return self

    @model_validator(mode="after")
    def _checkpointing_needs_first_order_graphs(self) -> "ImmunizeSection":
        if self.gradient_checkpointing and self.gradient == "exact":
            raise ValueError("gradient_checkpointing needs gradient = \"fd\" or \"first-order\" (exact "
                             "differentiates the backward pass itself)")
        return self

    @field_validator("imma_adaptation")
    @classmethod
    def _imma_adaptation(cls, value: str) -> str:
        if value == "lora":
            raise ValueError("'lora' is not implemented yet (a LoRA adapter on the lower set); "
                             "use 'unet' (DreamBooth) or 'xattn-kv' (Custom Diffusion)")
        return value

    @property
    def lower_set(self) -> str:
        return self.lower or ("xattn-kv" if self.method == "cp" else "unet")

    @property
    def upper_set(self) -> str:
        return self.upper or ("xattn-kv" if self.method == "cp" else "xattn")


# ------------------------------------------------------------------------------------------- attack

AttackMethod = Literal["lora", "dreambooth", "dreambooth-lora", "textual-inversion", "custom-diffusion"]


class AttackOverride(_Strict):
    """``[attack.by_method.<method>]``: settings of one attack method that differ from ``[attack]``."""

    steps: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0.0)
    batch: int | None = Field(default=None, ge=1)
    rank: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0.0)
    prior_preservation: bool | None = None


@dataclass(frozen=True)
class AttackSettings:
    """The resolved settings of one attack method (``AttackSection.settings(method)``)."""

    method: str
    steps: int
    lr: float
    batch: int
    rank: int
    alpha: float
    prior_preservation: bool
    eval_every: int
    eval_images: int
    eval_prompt: str | None
    token: str | None

    @property
    def eval_steps(self) -> list[int]:
        """The attack steps at which images are generated (every ``eval_every`` and the last)."""
        steps = list(range(self.eval_every, self.steps + 1, self.eval_every)) if self.eval_every else []
        return steps if steps and steps[-1] == self.steps else [*steps, self.steps]


class AttackSection(_Strict):
    """``[attack]``: the fine-tuning attacks run against a model (immunized or not)."""

    methods: list[AttackMethod] = Field(default_factory=lambda: ["lora"], min_length=1)
    steps: int = Field(default=400, ge=1)
    lr: float = Field(default=1e-4, gt=0.0)
    batch: int = Field(default=4, ge=1)
    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0.0)
    """LoRA alpha; None = ``rank``."""
    eval_every: int = Field(default=100, ge=0)
    """Generate evaluation images every N attack steps (0 = only after the last)."""
    eval_images: int = Field(default=8, ge=1)
    """Images generated per concept at each evaluation step."""
    eval_prompt: str | None = None
    """Template with {name} {prompt} {token} {class_prompt}; None = the concept prompt (with the
    attack token in place of the concept token)."""
    token: str | None = None
    """The attacker's special token; it must differ from every concept token."""
    prior_preservation: bool = False
    by_method: dict[AttackMethod, AttackOverride] = Field(default_factory=dict)

    def settings(self, method: str) -> AttackSettings:
        if method not in get_args(AttackMethod):
            raise ProfileError(f"unknown attack method '{method}'", field="attack.methods")
        over = self.by_method.get(method, AttackOverride())  # type: ignore[call-overload]
        rank = over.rank if over.rank is not None else self.rank
        alpha = over.alpha if over.alpha is not None else self.alpha
        return AttackSettings(
            method=method,
            steps=over.steps if over.steps is not None else self.steps,
            lr=over.lr if over.lr is not None else self.lr,
            batch=over.batch if over.batch is not None else self.batch,
            rank=rank,
            alpha=float(alpha if alpha is not None else rank),
            prior_preservation=(
                over.prior_preservation if over.prior_preservation is not None else self.prior_preservation
            ),
            eval_every=self.eval_every,
            eval_images=self.eval_images,
            eval_prompt=self.eval_prompt,
            token=self.token,
        )


# --------------------------------------------------------------------------------------------- eval


class EvalSection(_Strict):
    """``[eval]``: similarity metrics (MSGR / MRSGR) and the attack steps reported."""

    metrics: list[Literal["clip", "dino", "lpips", "judge", "judge-acc"]] = Field(
        default_factory=lambda: ["clip", "dino", "lpips"], min_length=1
    )
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    dino_model: str = "facebook/dino-vits16"
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    clip_weights: str | None = None
    """Local open_clip checkpoint (instead of downloading ``clip_pretrained``)."""
    dino_weights: str | None = None
    """Local folder of the DINO model (instead of the hub id)."""
    lpips_weights: str | None = None
    judge_weights: str | None = None
    """Weights of the testbed judge (None = the ones shipped with the testbed)."""
    steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Attack steps to report; empty = the last step of each attack."""


# ------------------------------------------------------------------------------------------ utility


class UtilitySection(_Strict):
    """``[utility]``: what a model still draws without any attack (:mod:`engine.metrics.utility`).

    Every immunization ends by generating ``images`` images of each target prompt, each other concept's prompt and
    ``captions`` held-out generic captions (none of those the merge regularises with), image *i* with seed
    ``seed + i``, and comparing them with the same-seed images of the parent model (the one immunization started
    from) and of the base model.
    """

    enabled: bool = True
    """Measure utility at the end of every immunization (``mima evaluate --utility`` measures it at any time)."""
    images: int = Field(default=8, ge=1)
    """Images per prompt (8: one image moves a concept's judge accuracy by 12.5 points, the mean over the others
    by about 1)."""
    captions: int = Field(default=8, ge=0)
    """Held-out generic captions (from ``regularization.captions``, none of the merge's), ``images`` images each."""
    seed: int = Field(default=30_000, ge=0)
    metrics: list[Literal["clip", "dino", "lpips", "judge", "judge-acc"]] = Field(default_factory=list)
    """Empty = ``[eval] metrics`` (``judge`` and ``judge-acc`` on the testbed, ``clip``, ``dino`` and ``lpips`` on
    Stable Diffusion). ``judge-acc``: share of a concept's images the judge names as it; ``clip``: CLIP score (prompt-image cosine);
    ``judge`` / ``dino`` / ``lpips``: fidelity, the similarity of each image to the parent's image of the same
    seed."""
    world: bool | None = None
    """Also count every style and object of the testbed world as an other concept (None = when the base is the
    testbed)."""
    collapse_share: float = Field(default=0.8, ge=0.0, le=1.0)
    """A model whose other concepts' utility is below this share of its parent's is marked *collapsed*."""
