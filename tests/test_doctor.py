"""``mima doctor`` on faked caches: what is missing, with the command that provides it, and which profiles run."""

from __future__ import annotations

import json

import pytest

from attack_helpers import invoke

SD = "CompVis/stable-diffusion-v1-4"
INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
         "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf" / "hub"


def fake_repo(cache, repo: str, files: dict[str, str]) -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    for name, text in files.items():
        path = root / "snapshots" / "abc123" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def sd_files(weights: bool = True) -> dict[str, str]:
    files = {"model_index.json": json.dumps(INDEX), "unet/config.json": "{}", "vae/config.json": "{}",
             "text_encoder/config.json": "{}", "tokenizer/tokenizer_config.json": "{}",
             "scheduler/scheduler_config.json": "{}"}
    if weights:
        files.update({"unet/diffusion_pytorch_model.safetensors": "x", "vae/diffusion_pytorch_model.safetensors": "x",
                      "text_encoder/model.safetensors": "x"})
    return files


def test_empty_caches_name_the_missing_weights_and_the_testbed_runs(caches):
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"hf download {SD}" in out and "hf download facebook/dino-vits16" in out
    assert "hf download timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors" in out
    assert "alexnet-owt-7be5be79.pth" in out
    for name in ("testbed", "testbed-relearn", "testbed-objects", "testbed-personal"):
        assert f"{name}: runs here" in out
    for name in ("styles", "objects", "personal"):
        assert f"{name}: does not run here" in out
    data = json.loads(invoke("doctor", "--json").output)
    profiles = {p["name"]: p for p in data["profiles"]}
    assert all(profiles[n]["runs"] and not profiles[n]["missing"] for n in profiles if n.startswith("testbed"))
    styles = profiles["styles"]
    assert not styles["runs"] and any(f"hf download {SD}" in m for m in styles["missing"])
    assert styles["group_size"] == 3 and styles["mode"] == "fd"
    assert any("image folders" in m and "data/customconcept101" in m for m in profiles["personal"]["missing"])
    weights = {w["name"]: w for w in data["weights"]}
    assert not weights[SD]["present"] and weights[SD]["where"] == str(caches)
    assert weights["testbed"]["present"] and weights["testbed judge"]["present"]


def test_a_cached_base_is_found_and_an_incomplete_one_says_what_it_lacks(caches):
    from engine.doctor import cached_pipelines, sd_weights

    fake_repo(caches, SD, sd_files())
    w = sd_weights(SD)
    assert w.present and w.where.endswith("snapshots/abc123") and not w.fix
    assert cached_pipelines() == [SD]
    fake_repo(caches, "someone/half", sd_files(weights=False))
    half = sd_weights("someone/half")
    assert not half.present and "lacks unet weights, vae weights, text_encoder weights" in half.where
    assert half.fix == "hf download someone/half"
    data = json.loads(invoke("doctor", "--json").output)
    styles = next(p for p in data["profiles"] if p["name"] == "styles")
    assert not any(SD in m for m in styles["missing"])  # the base is there; the metrics and a GPU are not


def test_gradient_modes_by_device_memory(monkeypatch, caches):
    import engine.doctor
    from engine.bench import predicted_gib
    from engine.doctor import fits, mode_fit

    assert predicted_gib("fd", 2) == pytest.approx(73.7) and predicted_gib("exact", 3) == pytest.approx(127.1)
    assert all(fits(v) for v in mode_fit(True, 3, None, 64).values())
    assert all(v.startswith("no CUDA device") for v in mode_fit(False, 2, None, 512).values())
    assert [m for m, v in mode_fit(False, 2, 79.2, 512).items() if fits(v)] == ["first-order"]  # fd: 74 of 79 GiB
    assert [m for m, v in mode_fit(False, 3, 79.2, 512).items() if fits(v)] == []
    assert [m for m, v in mode_fit(False, 3, 139.8, 512).items() if fits(v)] == ["fd", "first-order"]
    monkeypatch.setattr(engine.doctor, "devices", lambda: [{"name": "cpu", "threads": 1, "cores": 2},
                                                           {"name": "cuda:0", "model": "H200", "memory_gib": 139.8}])
    fake_repo(caches, SD, sd_files())
    styles = next(p for p in engine.doctor.diagnose().profiles if p.name == "styles")
    assert fits(styles.modes["fd"]) and not fits(styles.modes["exact"])
    assert not any(m.startswith("device") or SD in m for m in styles.missing)  # only the metrics' weights lack
