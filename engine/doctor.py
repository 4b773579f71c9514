"""What this machine can run: torch and its devices, the weights in the local caches, and for each shipped profile
whether it runs here, with the one command that provides each missing piece.

    from engine.doctor import diagnose
    d = diagnose()                                  # reads the caches only: never downloads
    [(p.name, p.runs, p.missing) for p in d.profiles]

Caches looked in (read at call time, so an environment set by a test or a wrapper counts): the Hugging Face hub
cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) for Stable Diffusion bases, the
open_clip weights of the ``timm`` repos and DINO; open_clip's own cache (``~/.cache/clip``) for weights that are
not on the hub; torch hub's checkpoints (``$TORCH_HOME/hub/checkpoints``) for the LPIPS trunk.

Gradient modes: a profile on a Stable Diffusion base fits where :func:`engine.bench.predicted_gib` (measured at SD
1.x shapes on one H200; an upper bound for fd and first-order, see :data:`engine.bench.STEP_GIB`) for its largest
group stays under 90% of the largest CUDA device's memory; a testbed profile runs on a CPU in every mode.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("exact", "fd", "first-order")
FIT_SHARE = 0.9
COMPONENT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


@dataclass
class Weight:
    """One set of weights a profile needs."""

    name: str
    what: str
    present: bool
    where: str
    fix: str = ""
    """The one command (or step) that provides it; empty when present."""


@dataclass
class ProfileCheck:
    name: str
    base: str
    runs: bool
    missing: list[str] = field(default_factory=list)
    """One line per missing piece, each with what provides it."""
    modes: dict[str, str] = field(default_factory=dict)
    """Gradient mode -> ``fits`` or why not."""
    mode: str = ""
    """The profile's own ``[immunize] gradient``."""
    group_size: int = 1


@dataclass
class Diagnosis:
    torch: str
    cuda: str | None
    devices: list[dict[str, Any]]
    caches: dict[str, str]
    weights: list[Weight]
    profiles: list[ProfileCheck]
    pipelines: list[str] = field(default_factory=list)
    """Other diffusers pipelines found in the Hugging Face cache (usable as ``[model] base``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- caches


def hub_cache() -> Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def torch_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached(repo: str, filename: str, cache: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=cache)
    return hit if isinstance(hit, str) else None


def sd_weights(repo: str, cache: Path | None = None) -> Weight:
    """Whether a diffusers pipeline repo is complete in the hub cache: ``model_index.json``, each component's
    config and the UNet's, VAE's and text encoder's weights (the safety checker is never loaded)."""
    import json

    cache = cache or hub_cache()
    fix = f"hf download {repo}"
    index = _cached(repo, "model_index.json", cache)
    if index is None:
        return Weight(repo, "Stable Diffusion base", False, str(cache), fix)
    components = [k for k, v in json.loads(Path(index).read_text()).items()
                  if isinstance(v, list) and v[0] is not None and k in ("unet", "vae", "text_encoder", "tokenizer",
                                                                         "scheduler")]
    missing = []
    for name in components:
        configs = {"tokenizer": ("tokenizer_config.json",), "scheduler": ("scheduler_config.json",)}.get(name,
                                                                                                        ("config.json",))
        if not any(_cached(repo, f"{name}/{c}", cache) for c in configs):
            missing.append(f"{name} config")
        if name in COMPONENT_FILES and not any(_cached(repo, f"{name}/{f}", cache) for f in COMPONENT_FILES[name]):
            missing.append(f"{name} weights")
    where = str(Path(index).parent)
    if missing:
        return Weight(repo, "Stable Diffusion base", False, f"{where} (lacks {', '.join(missing)})", fix)
    return Weight(repo, "Stable Diffusion base", True, where)


def clip_weights(model: str, pretrained: str, cache: Path | None = None) -> Weight:
    import open_clip

    from .metrics.clip import cached_checkpoint

    name = f"open_clip {model}/{pretrained}"
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if not cfg:
        return Weight(name, "CLIP metric", False, "", "unknown open_clip weights: set eval.clip_weights to a file")
    hit, repo, filename, where = cached_checkpoint(cfg, (cache or hub_cache()) if cfg.get("hf_hub") else None)
    if hit:
        return Weight(name, "CLIP metric", True, hit)
    fix = (f"hf download {repo} {filename}" if repo else
           f"python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}')\"")
    return Weight(name, "CLIP metric", False, where, fix)


def dino_weights(model: str, cache: Path | None = None) -> Weight:
    cache = cache or hub_cache()
    config = _cached(model, "config.json", cache)
    weights = [w for w in (_cached(model, f, cache) for f in ("model.safetensors", "pytorch_model.bin")) if w]
    if config and weights:
        return Weight(model, "DINO metric", True, weights[0])
    return Weight(model, "DINO metric", False, str(cache), f"hf download {model}")


def lpips_weights(net: str) -> Weight:
    from importlib.util import find_spec

    from .metrics.lpips import TRUNK_URLS

    url = TRUNK_URLS[net]
    path = torch_checkpoints() / os.path.basename(url)
    spec = find_spec("lpips")
    lins = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth" if spec and spec.origin else None
    if lins is None or not lins.is_file():
        return Weight(f"lpips {net}", "LPIPS metric", False, "the lpips package", "pip install lpips")
    if path.is_file():
        return Weight(f"lpips {net}", "LPIPS metric", True, str(path))
    return Weight(f"lpips {net}", "LPIPS metric", False, str(path),
                  f"python -c \"import torch; torch.hub.load_state_dict_from_url('{url}')\"")


def testbed_weights() -> list[Weight]:
    from .testbed import JUDGE_FILE, PIPELINE_DIR

    fix = "mima testbed build --install"
    return [Weight("testbed", "testbed pipeline", (PIPELINE_DIR / "model_index.json").is_file(), str(PIPELINE_DIR), fix),
            Weight("testbed judge", "judge metric", JUDGE_FILE.is_file(), str(JUDGE_FILE), fix)]


def cached_pipelines(cache: Path | None = None) -> list[str]:
    """Repos in the hub cache that hold a diffusers pipeline (``model_index.json``)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache or hub_cache())
    except Exception:  # no cache folder yet
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model"
                  and any(f.file_name == "model_index.json" for rev in r.revisions for f in rev.files))


# ----------------------------------------------------------------------------------------------- devices


def devices() -> list[dict[str, Any]]:
    import torch

    out = [{"name": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"name": f"cuda:{i}", "model": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def fits(verdict: str) -> bool:
    return verdict.startswith("fits")


def mode_fit(base_is_testbed: bool, n: int, gpu_gib: float | None, resolution: int) -> dict[str, str]:
    """Gradient mode -> ``fits ...`` or why not, for N concepts (see the module docstring)."""
    from .bench import predicted_gib

    if base_is_testbed:
        return {m: "fits (the testbed runs on a CPU)" for m in MODES}
    out = {}
    note = "" if resolution == 512 else f"; measured at 512 px, the profile uses {resolution}"
    for m in MODES:
        need = predicted_gib(m, n)
        if gpu_gib is None:
            out[m] = f"no CUDA device (a step needs ~{need:.0f} GiB of GPU memory for N = {n}; not practical on a CPU)"
        elif need <= FIT_SHARE * gpu_gib:
            out[m] = f"fits (~{need:.0f} of {gpu_gib:.0f} GiB for N = {n}{note})"
        else:
            out[m] = f"needs ~{need:.0f} GiB for N = {n}, more than {FIT_SHARE:.0%} of {gpu_gib:.0f} GiB{note}"
    return out


# ----------------------------------------------------------------------------------------------- profiles


def _metric_weights(name: str, ev: Any, found: dict[str, Weight]) -> Weight:
    """The weights metric ``name`` needs under ``[eval] ev`` (looked up once per run of the doctor)."""
    key = {"clip": f"clip {ev.clip_model}/{ev.clip_pretrained}", "dino": f"dino {ev.dino_model}",
           "lpips": f"lpips {ev.lpips_net}", "judge": "judge", "judge-acc": "judge"}[name]
    if key not in found:
        given = {"clip": ev.clip_weights, "dino": ev.dino_weights, "lpips": ev.lpips_weights,
                 "judge": ev.judge_weights, "judge-acc": ev.judge_weights}[name]
        if given:
            found[key] = Weight(str(given), f"{name} metric", Path(given).exists(), str(given),
                                f"put the weights at {given}")
        elif name == "clip":
            found[key] = clip_weights(ev.clip_model, ev.clip_pretrained)
        elif name == "dino":
            found[key] = dino_weights(ev.dino_model)
        elif name == "lpips":
            found[key] = lpips_weights(ev.lpips_net)
        else:
            found[key] = testbed_weights()[1]
    return found[key]


def _folders(profile: Any) -> list[str]:
    """Image folders the profile names that are missing or empty."""
    out = []
    for c in profile.concepts:
        for role in ("immunize", "attack", "reference"):
            spec = getattr(c.images, role)
            folder = getattr(spec, "folder", None)
            if folder is not None and not (Path(folder).is_dir() and any(Path(folder).iterdir())):
                out.append(str(folder))
    return out


def check_profile(name: str, path: Path, found: dict[str, Weight], gpu_gib: float | None) -> ProfileCheck:
    from .metrics.utility import utility_metrics
    from .profile import load_profile

    p = load_profile(path)
    base = str(p.model.base)
    testbed = base == "testbed"
    n = max([len(g) for g in p.groups.values()] or [len(p.concepts)])
    check = ProfileCheck(name, base, False, mode=p.immunize.gradient, group_size=n)
    needed: list[Weight] = []
    if testbed:
        needed.append(found.setdefault("testbed", testbed_weights()[0]))
    elif Path(base).is_dir():
        needed.append(Weight(base, "base folder", (Path(base) / "model_index.json").is_file(), base,
                             f"a diffusers pipeline folder at {base}"))
    else:
        needed.append(found.setdefault(f"sd {base}", sd_weights(base)))
    for metric in dict.fromkeys([*p.eval.metrics, *utility_metrics(p)]):
        needed.append(_metric_weights(metric, p.eval, found))
    check.missing = [f"{w.what} {w.name}: {w.fix}" for w in needed if not w.present]
    folders = _folders(p)
    if folders:
        check.missing.append(f"{len(folders)} image folders missing or empty (e.g. {folders[0]}): put the concepts' "
                             f"photos there, as `mima profiles show {name}` describes")
    check.modes = mode_fit(testbed, n, gpu_gib, p.immunize.resolution)
    if not fits(check.modes[check.mode]):
        other = next((m for m in MODES if fits(check.modes[m])), None)
        check.missing.append(f"device for the {check.mode} gradient: {check.modes[check.mode]}"
                             + (f"; --set immunize.gradient={other} fits" if other else ""))
    check.runs = not check.missing
    return check


def diagnose(profiles: dict[str, Path] | None = None) -> Diagnosis:
    """Everything :mod:`this module <engine.doctor>` checks (``profiles``: default the shipped ones)."""
    import torch

    from .profile import shipped_profiles

    devs = devices()
    gpus = [d["memory_gib"] for d in devs if d["name"].startswith("cuda")]
    found: dict[str, Weight] = {}
    checks = [check_profile(name, path, found, max(gpus) if gpus else None)
              for name, path in sorted((profiles or shipped_profiles()).items())]
    caches = {"huggingface": str(hub_cache()), "torch": str(torch_checkpoints()),
              "open_clip": os.path.expanduser("~/.cache/clip")}
    return Diagnosis(torch.__version__, torch.version.cuda, devs, caches, list(found.values()), checks,
                     cached_pipelines())
