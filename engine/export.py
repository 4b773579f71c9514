"""Export a model that mima wrote as a standard diffusers pipeline folder, with a Hugging Face model card.

    from engine.export import export_model
    done = export_model("runs/<id>", "release", runs_dir="runs", dtype="float16")
    # then, anywhere diffusers is installed (mima need not be):
    #   StableDiffusionPipeline.from_pretrained("release")

A run keeps only what it changed: ``<run>/model/unet`` (and ``text_encoder`` when it changed) beside
``mima_model.json``, which names the model it completes; that model may itself be a run (an immunization starts from
an erase run, a DreamBooth attack from the model it attacked). :func:`model_chain` follows the chain down to a full
pipeline folder; the export loads that pipeline with the changed parts swapped in and saves the whole of it as
safetensors in ``dtype``, with ``README.md``: the model card (:func:`model_card`). Its numbers are those of ``mima
report --json RUN``: the same functions compute them.

What can be exported: a finished ``erase`` or ``immunize`` run, and the saved output of a ``dreambooth`` attack
(``mima attack --save-weights``; ``concept`` picks one when the run saved several). A run that did not finish, or
whose model is marked collapsed by its utility (:mod:`engine.metrics.utility`), is refused with
:class:`ExportRefused` unless ``force``. The folder is written beside ``out`` under a temporary name and renamed
into place, so that a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["ExportRefused", "ExportSource", "Exported", "export_model", "find_source", "model_card", "model_chain",
           "refusals", "base_license"]

DTYPES = ("float32", "float16", "bfloat16")
KNOWN_LICENSES = {"CompVis/stable-diffusion-v1-4": "creativeml-openrail-m", "testbed": "apache-2.0"}
"""Licenses of the bases the shipped profiles name, for when the base's own model card is not in the local cache."""
WEIGHT_SUFFIXES = (".safetensors",)
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


class ExportRefused(UsageError):
    """A model that should not be published as it is (unfinished run, collapsed model, bad reference)."""


@dataclass
class ExportSource:
    """What is exported: the model folder, and the run it came from."""

    model_dir: Path
    run_dir: Path
    status: dict[str, Any]
    kind: str
    """``erase``, ``immunize`` or ``attack``."""
    concept: str | None = None
    """The attacked concept (attack outputs only)."""

    @property
    def run_id(self) -> str:
        return self.run_dir.name


@dataclass
class Exported:
    out: Path
    dtype: str
    files: list[str]
    card: Any
    """The ``huggingface_hub.ModelCard`` written as ``out/README.md``."""
    forced: list[str] = field(default_factory=list)
    """The refusals that ``force`` overrode."""

    @property
    def size_mb(self) -> float:
        return sum((self.out / f).stat().st_size for f in self.files) / 1e6


# ------------------------------------------------------------------------------------------- sources


def find_source(ref: str | Path, runs_dir: str | Path, concept: str | None = None) -> ExportSource:
    """The model a run reference names (a run id, ``latest``, a run folder)."""
    from .models import MODEL_JSON
    from .runs import find_run, read_status, weights_dir

    run_dir = find_run(runs_dir, str(ref))
    st = read_status(run_dir)
    kind = st.get("kind")
    if kind in ("erase", "immunize"):
        if concept:
            raise ExportRefused(f"{run_dir.name}: --concept is for attack runs; an {kind} run has one model")
        return ExportSource(run_dir / "model", run_dir, st, kind)
    if kind != "attack":
        raise ExportRefused(f"{run_dir.name} is a {kind!r} run; export takes an erase, immunize or DreamBooth attack run")
    method = st.get("method")
    if method != "dreambooth":
        raise ExportRefused(f"{run_dir.name} is a {method} attack: only DreamBooth outputs are whole models "
                            f"(LoRA, embeddings and k/v deltas load onto their base with diffusers instead)")
    saved = sorted(p.parent.name for p in (run_dir / "checkpoints").glob(f"*/{MODEL_JSON}"))
    if concept is None:
        if len(saved) != 1:
            raise ExportRefused(f"{run_dir.name}: " + (f"pass --concept, one of: {', '.join(saved)}" if saved else
                                "no saved attack output (run `mima attack` with --save-weights)"))
        folder = run_dir / "checkpoints" / saved[0]
    else:
        folder = weights_dir(run_dir, concept)
        if not (folder / MODEL_JSON).exists():
            raise ExportRefused(f"{run_dir.name}: no saved DreamBooth output for concept {concept!r}"
                                + (f" (saved: {', '.join(saved)})" if saved else ""))
    meta = _read_json(folder / "mima_attack.json")
    return ExportSource(folder, run_dir, st, "attack", meta.get("concept") or concept or folder.name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _locate(ref: str, runs_dir: Path) -> Path:
    """The folder a ``mima_model.json`` base names: as given, else a run of that name under ``runs_dir`` (a base
    recorded relative to another working directory)."""
    from .models import resolve_model

    path = Path(ref)
    if not path.exists() and (runs_dir / path.name).is_dir():
        path = runs_dir / path.name
    return resolve_model(path if path.exists() else ref)


def model_chain(model_dir: str | Path, runs_dir: str | Path = "runs") -> tuple[Path, dict[str, Path], str]:
    """``(pipeline folder, {component: folder}, base)``: the full pipeline a mima model completes, the components
    that replace its own (the nearest model's wins), and that pipeline's reference as the runs recorded it (the
    folder itself for a full pipeline)."""
    from .models import MODEL_JSON

    folder, parts, seen = Path(model_dir), {}, set()
    base = str(folder)
    while not (folder / "model_index.json").exists():
        meta = _read_json(folder / MODEL_JSON)
        if not meta.get("base"):
            raise ExportRefused(f"{folder}: neither a pipeline folder (model_index.json) nor a mima model "
                                f"({MODEL_JSON} naming its base)")
        if folder.resolve() in seen:
            raise ExportRefused(f"{folder}: {MODEL_JSON} points back at itself")
        seen.add(folder.resolve())
        for name in ("unet", "text_encoder"):
            if (folder / name / "config.json").exists():
                parts.setdefault(name, folder / name)
        base = str(meta["base"])
        folder = _locate(base, Path(runs_dir))
    return folder, parts, base


# ------------------------------------------------------------------------------------------- checks


def model_utility(source: ExportSource, runs_dir: str | Path):
    """The newest utility of the exported model: ``mima evaluate --utility`` runs first, then its own run's (the
    one the report shows)."""
    from .report.pairs import metric_events, newest_utility
    from .runs import Runs

    if source.kind == "attack":
        return None
    runs = Runs.scan(runs_dir)
    evaluate = [(r.id, metric_events(r.dir)) for r in runs.select("evaluate", state=None)]
    return newest_utility(runs, source.run_id, evaluate)


def refusals(source: ExportSource, utility: Any) -> list[str]:
    """Why ``source`` should not be published as it is (empty: nothing against it)."""
    out = []
    state = source.status.get("state")
    if source.kind == "attack":
        done = (source.status.get("extra") or {}).get("done") or []
        if state != "finished" and source.concept not in done:
            out.append(f"run {source.run_id} did not finish the attack on {source.concept} (state: {state})")
    elif state != "finished":
        out.append(f"run {source.run_id} did not finish (state: {state})")
    if utility is not None and utility.collapsed:
        share = utility.share
        out.append(f"its model is marked collapsed: without any attack it draws the other concepts at "
                   f"{share:.0%} of its parent's {utility.primary} (below {utility.threshold:.0%})")
    if not (source.model_dir / "model_index.json").exists() and not (source.model_dir / "unet").is_dir():
        out.append(f"run {source.run_id} holds no model ({source.model_dir} is missing)")
    return out


# ------------------------------------------------------------------------------------------- license


def base_license(base: str, hf_cache: str | Path | None = None) -> str | None:
    """The license of a base model: its model card's (a local folder's README.md or the hub cache's), else the
    license known for the shipped profiles' bases, else None."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    card = None
    if Path(base).is_dir():
        card = Path(base) / "README.md"
    elif base.count("/") == 1:
        hit = try_to_load_from_cache(base, "README.md", cache_dir=hf_cache)
        card = Path(hit) if isinstance(hit, str) else None
    if card is not None and card.is_file():
        try:
            license_ = ModelCard.load(card).data.license
        except Exception:  # a README without front matter
            license_ = None
        if license_:
            return str(license_)
    return KNOWN_LICENSES.get(base)


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/")) and not Path(ref).exists()


# ------------------------------------------------------------------------------------------- card


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.0%}"


def _report(source: ExportSource, runs_dir: Path):
    """The report of the attack pairs of an immunization run (``mima report RUN``), or None without any."""
    from .errors import EvaluationError
    from .report import build_report, collect_pairs

    if source.kind != "immunize":
        return None
    try:
        pairs = collect_pairs(runs_dir, [source.run_id])
    except EvaluationError:
        return None
    return build_report(pairs) if pairs else None


def _utility_lines(utility: Any) -> list[str]:
    if utility is None:
        return ["Not measured (`mima evaluate --utility RUN` measures it)."]
    lines = [f"What the model draws without any attack, scored by `{utility.primary}` ({utility.images} images per "
             f"prompt, fixed seeds), beside the model it started from (parent) and the base:", "",
             "| model | targets | other concepts | generic captions |", "|---|---:|---:|---:|"]
    for which in ("base", "parent", "model"):
        if which in utility.scores:
            lines.append(f"| {'this model' if which == 'model' else which} | "
                         + " | ".join(_f(utility.role_mean(which, r)) for r in ("target", "other", "caption")) + " |")
    lines += ["", f"Other concepts at {_pct(utility.share)} of the parent's: "
              + ("**collapsed** (below " if utility.collapsed else "kept (collapse below ")
              + f"{utility.threshold:.0%})."]
    return lines


def _attack_lines(report: Any, run_id: str) -> tuple[list[str], list[str]]:
    """The MSGR / MRSGR rows of each attack pair and the attacks' settings."""
    from .runs import read_status

    if report is None:
        return [f"Not attacked yet (`mima attack --run {run_id}` attacks it and its unimmunized twin)."], []
    rows = ["MSGR: how much of the attack's effect on the unimmunized twin the immunization takes away (higher = "
            "stronger); MRSGR: how much more it spoils the targets than the other concepts (higher = more selective); "
            f"success: the attack on the twin (judge accuracy). As `mima report --json {run_id}` gives them:", "",
            "| attack | step | metric | MSGR | MRSGR | success on the twin |", "|---|---:|---|---:|---:|---:|"]
    settings = []
    for pair, p in zip(report.pairs, report.to_dict()["pairs"]):
        success = p["success"].get("judge-acc", next(iter(p["success"].values()), None)) if p["success"] else None
        for metric in dict.fromkeys([*p["msgr"], *p["mrsgr"]]):
            rows.append(f"| {p['attack']} | {p['step']} | {metric} | {_f(p['msgr'].get(metric))} | "
                        f"{_f(p['mrsgr'].get(metric))} | {_pct(success)} |")
        s = (read_status(pair.run_dir).get("extra") or {}).get("settings") or {}
        settings.append(f"- `{p['attack']}`: " + ", ".join(f"{k} {s[k]}" for k in ("steps", "lr", "batch", "rank")
                                                           if k in s) + f" (run {p['run']}, twin {p['twin']})")
    return rows, settings


def _settings_lines(source: ExportSource, profile: Any) -> list[str]:
    extra = source.status.get("extra") or {}
    if source.kind == "immunize":
        im = profile.immunize
        items = [("method", source.status.get("method")), ("steps", im.steps), ("inner lr", im.inner_lr),
                 ("outer lr", im.outer_lr), ("lower level", extra.get("lower")), ("upper level", extra.get("upper")),
                 ("gradient", im.gradient), ("merge anchor", im.merge.anchor), ("prior weight", im.prior_weight),
                 ("preserve weight", im.preserve_weight), ("ascent", im.ascent),
                 ("started from", extra.get("parent_model"))]
    elif source.kind == "erase":
        e = profile.erase
        items = [("method", "uce"), ("target", e.target), ("lamb", e.lamb), ("erase scale", e.erase_scale),
                 ("preserve scale", e.preserve_scale), ("padding", e.padding)]
    else:
        s = extra.get("settings") or {}
        items = [("method", "dreambooth"), *((k, s.get(k)) for k in ("steps", "lr", "batch", "prior_preservation")),
                 ("attacked model", extra.get("model"))]
    return [f"- {k}: `{v}`" for k, v in items if v is not None]


def model_card(source: ExportSource, runs_dir: str | Path, *, utility: Any = None, report: Any = None,
               forced: list[str] | None = None, base: str | None = None, hf_cache: str | Path | None = None):
    """The ``huggingface_hub.ModelCard`` of an export (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .runs import RunReader

    runs_dir = Path(runs_dir)
    profile = RunReader(source.run_dir).profile()
    base = base or model_chain(source.model_dir, runs_dir)[2]
    testbed = base == "testbed"
    concepts = list(source.status.get("concepts") or [])
    what = {"immunize": "immunized", "erase": "erased", "attack": "dreambooth"}[source.kind]
    tags = ["mima", what, "text-to-image", "stable-diffusion", "diffusers"]
    if source.kind == "immunize":
        tags.insert(2, str(source.status.get("method")))
    if testbed:
        tags.append("mima-testbed")
    data = ModelCardData(license=base_license(base, hf_cache) or "other", library_name="diffusers",
                         pipeline_tag="text-to-image", tags=tags, base_model=base if _is_hub_id(base) else None)
    title = {"immunize": f"Immunized against {', '.join(concepts)}", "erase": f"{', '.join(concepts)} erased",
             "attack": f"DreamBooth on {source.concept}"}[source.kind]
    lines = [f"# {title}", ""]
    if source.kind == "immunize":
        lines.append(f"Made with mima by `{source.status.get('method')}` immunization "
                     f"(MIMA, Zheng & Yeh, AAAI 2025, and its baselines): fine-tuning this model on the concepts below "
                     f"is meant to stop working, while other concepts stay learnable.")
    elif source.kind == "erase":
        lines.append("Made with mima: the concepts below are erased from the cross-attention by UCE (a closed-form "
                     "edit); an erased concept can be taught again by fine-tuning, unless the model is also immunized.")
    else:
        lines.append("The output of mima's DreamBooth attack (full UNet fine-tuning) on one concept, as the attack "
                     "evaluations measured it.")
    lines += ["", f"Base model: `{base}`" + (" (the tiny testbed pipeline shipped with mima: 64x64 images of a "
                                            "procedural world, not Stable Diffusion)" if testbed else ""), ""]
    lines += ["## Concepts", "", "| concept | prompt |", "|---|---|"]
    names = [source.concept] if source.kind == "attack" else concepts
    for name in names:
        lines.append(f"| {name} | {profile.concept(name).prompt if name in profile.concept_names else ''} |")
    lines += ["", "## Method and settings", "", *_settings_lines(source, profile), "",
              f"Run `{source.run_id}` (profile `{source.status.get('profile')}`, group `{source.status.get('group')}`)."]
    if source.kind != "attack":
        lines += ["", "## Utility", "", *_utility_lines(utility)]
    if source.kind == "immunize":
        att, settings = _attack_lines(report, source.run_id)
        lines += ["", "## Immunity", "", *att]
        if settings:
            lines += ["", "Attacks tested against (each also run on the unimmunized twin with the same data and "
                      "seeds):", "", *settings]
    lines += ["", "## Limits", ""]
    limits = [f"Exported with --force although {r}." for r in forced or []]
    if utility is not None and utility.collapsed and not forced:
        limits.append("The model is marked collapsed: its MSGR measures a broken model, not immunity.")
    if testbed:
        limits.append("A testbed model: its numbers are testbed numbers (the testbed's judge), not Stable Diffusion "
                      "numbers.")
    if source.kind == "immunize":
        limits.append("Immunity was measured against the attacks listed above, with their settings and data only; "
                      "other attacks, more steps, other learning rates or images were not tested, and a determined "
                      "attacker may still re-learn the concepts.")
    limits.append(f"The base model's license (`{data.license}`) and its use restrictions apply to this model.")
    lines += [f"- {x}" for x in limits]
    prompt = next((profile.concept(n).prompt for n in names if n in profile.concept_names), "a photo")
    lines += ["", "## Use", "", "```python", "from diffusers import StableDiffusionPipeline",
              'pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")',
              f'image = pipe("{prompt}", num_inference_steps={profile.model.sample_steps}, '
              f'guidance_scale={profile.model.guidance}).images[0]', "```", "",
              "## Resolved profile", "", "<details><summary>profile.toml of the run</summary>", "", "```toml",
              (RunReader(source.run_dir).profile_text() or "").rstrip(), "```", "", "</details>", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------- export


def _check_files(folder: Path) -> list[str]:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    unsafe = [f for f in files if f.endswith(UNSAFE_SUFFIXES)]
    if unsafe:
        raise RuntimeError(f"the export wrote non-safetensors weights: {', '.join(unsafe)}")
    return files


def export_model(ref: str | Path, out: str | Path, *, runs_dir: str | Path = "runs", dtype: str = "float32",
                 concept: str | None = None, force: bool = False, overwrite: bool = False,
                 progress: Callable[[str, int, int, dict | None], None] | None = None) -> Exported:
    """Write the model of run ``ref`` as a full diffusers pipeline folder ``out`` with a model card (see the
    module docstring). ``overwrite`` replaces an existing ``out``; ``force`` exports what :func:`refusals` refuses."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from .models import pick_dtype

    if dtype not in DTYPES:
        raise ExportRefused(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    runs_dir, out = Path(runs_dir), Path(out)
    if out.exists():
        if not overwrite:
            raise ExportRefused(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").exists()):
            raise ExportRefused(f"{out} is not an earlier export (no model_index.json); --overwrite replaces only "
                                f"those: choose another folder")
    source = find_source(ref, runs_dir, concept)
    utility = model_utility(source, runs_dir)
    reasons = refusals(source, utility)
    if reasons and not force:
        raise ExportRefused(f"not exported: {'; '.join(reasons)} (pass --force to export it anyway)")
    step = (lambda i, what: progress("export", i, 4, {"step": what})) if progress else (lambda i, what: None)
    step(0, "load")
    folder, parts, base = model_chain(source.model_dir, runs_dir)
    torch_dtype = pick_dtype(dtype)
    swapped = {}
    if "unet" in parts:
        swapped["unet"] = UNet2DConditionModel.from_pretrained(parts["unet"], dtype=torch_dtype)
    if "text_encoder" in parts:
        from transformers import CLIPTextModel

        swapped["text_encoder"] = CLIPTextModel.from_pretrained(parts["text_encoder"], dtype=torch_dtype)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, local_files_only=True, **swapped)
    step(1, "save")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if (folder / "testbed.json").is_file():  # what the testbed pipeline was built with, for mima
            shutil.copy2(folder / "testbed.json", tmp / "testbed.json")
        step(2, "card")
        card = model_card(source, runs_dir, utility=utility, report=_report(source, runs_dir),
                          forced=reasons if force else [], base=base)
        card.save(tmp / "README.md")
        files = _check_files(tmp)
        step(3, "rename")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(4, "done")
    return Exported(out, dtype, files, card, reasons if force else [])


def _replace_dir(new: Path, out: Path) -> None:
    """Move the folder ``new`` to ``out``; an existing ``out`` is replaced only once ``new`` is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
