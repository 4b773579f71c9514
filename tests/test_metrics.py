"""engine.metrics backends: inputs, preprocessing per backbone, random-init plumbing, judge, missing weights.

No pretrained weights are needed: backbones are built with ``random_init=True`` (whose numbers mean nothing and
are only checked for the plumbing), and the formulas are checked against the libraries on the same modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.metrics import MetricWeightsMissing, get_backend, get_backends, require_trained
from engine.metrics.base import FeatureCache, fingerprint, to_uint8_list
from engine.profile import EvalSection

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def others() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)


def grey(value: int, n: int = 1, h: int = 32, w: int = 32) -> np.ndarray:
    return np.full((n, h, w, 3), value, np.uint8)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2, 3).flatten(1)  # [3, everything]


def check_similarity_plumbing(backend, a, b):
    m = backend.pair_matrix(a, b)
    assert m.shape == (len(a), len(b)) and m.dtype == torch.float32
    assert backend.mean_similarity(a, b) == pytest.approx(float(m.double().mean()), abs=1e-6)
    # M(x, x): every image is identical to itself
    assert torch.allclose(backend.pair_matrix(a, a).diagonal(), torch.ones(len(a)), atol=1e-5)
    # symmetric, and the same images in another container give the same numbers
    assert torch.allclose(backend.pair_matrix(b, a), m.T, atol=1e-5)
    pil = [Image.fromarray(x) for x in a]
    assert torch.allclose(backend.pair_matrix(pil, b), m, atol=1e-5)
    assert backend.random_init and "random init" in backend.label
    with pytest.raises(ValueError, match="randomly initialised"):
        require_trained(backend)
    with pytest.raises(ValueError, match="empty"):
        backend.mean_similarity(a[:0], b)


# ----------------------------------------------------------------------------------------------- inputs


def test_inputs_and_fingerprints(images):
    as_list = to_uint8_list(images)
    assert len(as_list) == 3 and as_list[0].shape == (48, 48, 3)
    pil = [Image.fromarray(x) for x in images]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert all(np.array_equal(x, y) for x, y in zip(to_uint8_list(pil), as_list))
    assert all(np.array_equal(x, y) for x, y in zip(to_uint8_list(tensor), as_list))
    assert to_uint8_list(images[0])[0].shape == (48, 48, 3)
    assert fingerprint(images) == fingerprint(pil) == fingerprint(images.copy())
    assert fingerprint(images) != fingerprint(images[:2]) and fingerprint(images) != fingerprint(images[::-1])
    with pytest.raises(TypeError):
        to_uint8_list(images.astype(np.float32))
    with pytest.raises(ValueError):
        to_uint8_list(np.zeros((2, 8, 8), np.uint8))


def test_feature_cache_hits_and_bound(images):
    cache = FeatureCache(max_bytes=3 * 4 * 10)
    calls = []

    def compute(x):
        calls.append(1)
        return torch.zeros(len(x), 10)

    cache.get(images, compute)
    cache.get(images.copy(), compute)  # same pixels, another array: a hit
    assert (cache.hits, cache.misses, len(calls)) == (1, 1, 1)
    cache.get(images[:2], compute)  # 3*10 + 2*10 floats exceed the bound: the oldest entry goes
    assert len(cache) == 1 and cache.nbytes == 2 * 10 * 4


# ----------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip():
    return get_backend("clip", random_init=True)


def test_clip_preprocessing(clip):
    cfg = clip.preprocess_cfg
    assert clip.image_size == (224, 224) and cfg["interpolation"] == "bicubic" and cfg["resize_mode"] == "shortest"
    assert tuple(cfg["mean"]) == pytest.approx(OPENAI_MEAN) and tuple(cfg["std"]) == pytest.approx(OPENAI_STD)
    x = clip.preprocess(grey(128, n=2, h=64, w=96))  # any size: shorter side to 224, centre crop
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(per_channel(x), expected[:, None].expand(3, x[0, 0].numel() * 2), atol=1e-5)
    black, white = clip.preprocess(grey(0)), clip.preprocess(grey(255))
    assert torch.allclose(per_channel(black).amax(1), -torch.tensor(OPENAI_MEAN) / torch.tensor(OPENAI_STD), atol=1e-5)
    assert torch.allclose(per_channel(white).amin(1), (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD), atol=1e-5)


def test_clip_plumbing(clip, images, others):
    f = clip.features(images)
    assert f.shape == (3, 512) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        direct = clip.model.encode_image(clip.preprocess(images))
    assert torch.allclose(f, torch.nn.functional.normalize(direct, dim=-1), atol=1e-5)
    check_similarity_plumbing(clip, images, others)
    assert clip.cache.hits > 0


# ----------------------------------------------------------------------------------------------- DINO


@pytest.fixture(scope="module")
def dino():
    return get_backend("dino", random_init=True)


def test_dino_preprocessing(dino):
    assert dino.model.config.hidden_size == 384 and dino.model.config.patch_size == 16
    assert dino.model.pooler is None
    x = dino.preprocess(grey(200, n=2, h=64, w=100))
    assert x.shape == (2, 3, 224, 224)
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(per_channel(x), expected[:, None].expand_as(per_channel(x)), atol=1e-5)
    # shorter side to 256, centre 224: of a 256x512 image only the white columns 144..367 are kept
    img = np.zeros((1, 256, 512, 3), np.uint8)
    img[:, :, 144:368] = 255
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(dino.preprocess(img), white.view(1, 3, 1, 1).expand(1, 3, 224, 224), atol=1e-5)


def test_dino_plumbing(dino, images, others):
    f = dino.features(images)
    with torch.no_grad():
        cls = dino.model(pixel_values=dino.preprocess(images)).last_hidden_state[:, 0]
    assert f.shape == (3, 384)
    assert torch.allclose(f, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    check_similarity_plumbing(dino, images, others)


# ----------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_backend():
    return get_backend("lpips", random_init=True, size=64)


def test_lpips_preprocessing():
    from engine.metrics.lpips import to_lpips_input

    x = to_lpips_input(np.concatenate([grey(0), grey(255)]))
    assert x.shape == (2, 3, 256, 256)
    assert float(x[0].max()) == -1.0 and float(x[1].min()) == 1.0
    mid = to_lpips_input(grey(51, h=100, w=30), size=32)  # upsampled, non-square: shorter side 32, centre crop
    assert mid.shape == (1, 3, 32, 32) and torch.allclose(mid, torch.full_like(mid, 51 / 255 * 2 - 1), atol=1e-5)


def test_lpips_pairwise_equals_lpips_forward(lpips_backend, images, others):
    d = lpips_backend.pairwise(images, others)
    xa, xb = lpips_backend.preprocess(images), lpips_backend.preprocess(others)
    with torch.no_grad():
        ref = torch.stack([torch.cat([lpips_backend.model(xa[i : i + 1], xb[j : j + 1]).view(1) for j in range(len(xb))])
                           for i in range(len(xa))])
    assert torch.allclose(d, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(lpips_backend.pair_matrix(images, others), 1 - ref, rtol=1e-4, atol=1e-5)
    assert lpips_backend.pairwise(images, images).diagonal().abs().max() < 1e-5
    check_similarity_plumbing(lpips_backend, images, others)


def test_lpips_loads_a_torchvision_trunk_file_and_the_shipped_linear_layers(tmp_path):
    import lpips
    import torchvision

    torch.manual_seed(0)
    trunk = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(trunk, path)
    backend = get_backend("lpips", {"lpips_weights": str(path)}, size=64)
    assert not backend.random_init and backend.label == "lpips alex"
    net = backend.model.net
    assert torch.equal(getattr(net.slice1, "0").weight, trunk["features.0.weight"])
    assert torch.equal(getattr(net.slice5, "10").weight, trunk["features.10.weight"])
    shipped = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(backend.model.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    # non-negative learned weights on identical inputs: 1 - LPIPS is exactly 1 and below 1 otherwise
    sims = backend.pair_matrix(grey(30, n=2), np.concatenate([grey(30), grey(220)]))
    assert sims[:, 0] == pytest.approx([1.0, 1.0], abs=1e-5) and bool((sims[:, 1] < 1).all())


# ----------------------------------------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def judges():
    return get_backends({"metrics": ["judge", "judge-acc"]}, random_init=True)


def test_judge_backend_matches_the_testbed_judge(judges):
    from engine.testbed import judge as J
    from engine.testbed.world import Item, render_many

    sim, acc = judges["judge"], judges["judge-acc"]
    assert sim.judge is acc.judge and sim.random_init and acc.random_init
    a = render_many([Item(style="ringo"), Item(object="star"), Item(style="ringo", object="fish")], seed=1)
    b = render_many([Item(object="fish"), Item(style="ringo")], seed=2)
    x = sim.preprocess(a)
    assert x.shape == (3, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.allclose(sim.features(a), sim.judge.features(a), atol=1e-6)
    assert sim.mean_similarity(a, b) == pytest.approx(J.similarity(sim.judge, a, b), abs=1e-6)
    check_similarity_plumbing(sim, a, b)
    for concept in ("ringo", "star", "fish"):
        assert acc.accuracy(a, concept) == pytest.approx(J.accuracy(acc.judge, a, concept))
    # agreement = sum over the head's labels of p_a(c) p_b(c)
    la, lb = acc.judge.classify(a)["object"], acc.judge.classify(b)["object"]
    pa, pb = (torch.bincount(v, minlength=9).double() / len(v) for v in (la, lb))
    assert acc.agreement(a, b, "star") == pytest.approx(float((pa * pb).sum()))
    assert acc.agreement(a, a, "star") >= 1 / 3
    with pytest.raises(KeyError, match="no head"):
        acc.accuracy(a, "vangogh")


def test_judge_weights_from_a_file(tmp_path):
    from engine.testbed.judge import Judge, save_judge

    torch.manual_seed(3)
    save_judge(Judge(), tmp_path / "j.safetensors")
    backend = get_backend("judge-acc", EvalSection(judge_weights=str(tmp_path / "j.safetensors")))
    assert not backend.random_init and backend.kind == "accuracy"
    require_trained(backend)


# ----------------------------------------------------------------------------------------------- registry, weights


def test_registry_errors():
    with pytest.raises(ValueError, match="did you mean 'dino'"):
        get_backend("dina", random_init=True)
    with pytest.raises(ValueError, match="unknown open_clip weights 'nope'"):
        get_backend("clip", {"clip_pretrained": "nope"})
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        from engine.metrics.lpips import load_lpips

        load_lpips("resnet")
    with pytest.raises(TypeError):
        get_backend("judge", 3)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "metric, config, names",
    [
        ("clip", {}, ["CLIP weights ViT-B-32/openai", "timm/vit_base_patch32_clip_224.openai", "eval.clip_weights="]),
        ("clip", {"clip_model": "ViT-L-14"}, ["CLIP weights ViT-L-14/openai", "eval.clip_weights="]),
        ("dino", {}, ["DINO weights facebook/dino-vits16", "eval.dino_weights=", "hf download facebook/dino-vits16"]),
        ("lpips", {}, ["LPIPS trunk weights", "alexnet-owt-7be5be79.pth", "eval.lpips_weights="]),
    ],
)
def test_missing_weights_offline_is_one_line(offline, tmp_path, metric, config, names):
    with pytest.raises(MetricWeightsMissing) as info:
        get_backend(metric, config, cache_dir=tmp_path)
    text = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in text and "offline" in text and str(tmp_path) in text
    for name in names:
        assert name in text


@pytest.mark.parametrize(
    "metric, key",
    [("clip", "clip_weights"), ("dino", "dino_weights"), ("lpips", "lpips_weights"), ("judge", "judge_weights")],
)
def test_missing_weights_at_a_given_path(tmp_path, metric, key):
    missing = tmp_path / "nowhere"
    with pytest.raises(MetricWeightsMissing) as info:
        get_backend(metric, {key: str(missing)})
    text = str(info.value)
    assert "\n" not in text and f"eval.{key}={missing}" in text


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["clip", "dino", "lpips"])
def test_pretrained_backbones_when_cached(monkeypatch, metric, images, others):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # caches only: never a download in a test
    try:
        backend = get_backend(metric)
    except MetricWeightsMissing as e:
        pytest.skip(str(e))
    assert not backend.random_init
    require_trained(backend)
    m = backend.pair_matrix(images, others)
    assert bool((m <= 1 + 1e-5).all()) and bool((m >= -1 - 1e-5).all())
    assert torch.allclose(backend.pair_matrix(images, images).diagonal(), torch.ones(3), atol=1e-5)


def test_clip_checkpoint_is_found_in_the_hugging_face_cache(offline, tmp_path):
    from engine.metrics.clip import resolve_checkpoint

    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"stub")
    (tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("abc123")
    path, cfg = resolve_checkpoint("ViT-B-32", "openai", cache_dir=tmp_path)
    assert path == str(snapshot / "open_clip_pytorch_model.bin") and cfg["quick_gelu"] is True
    given = tmp_path / "mine.bin"
    given.write_bytes(b"stub")
    assert resolve_checkpoint("ViT-B-32", "openai", weights=str(given))[0] == str(given)


def test_dino_weights_from_a_local_folder(offline, tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    tiny = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              patch_size=8, image_size=32), add_pooling_layer=False)
    tiny.save_pretrained(tmp_path / "tiny-dino")
    backend = get_backend("dino", {"dino_weights": str(tmp_path / "tiny-dino")})
    assert not backend.random_init and backend.image_size == 32
    assert torch.equal(backend.model.embeddings.cls_token, tiny.embeddings.cls_token)
    assert backend.preprocess(grey(9, h=50, w=70)).shape == (1, 3, 32, 32)
    assert backend.features(grey(9, n=2)).shape == (2, 32)
    with pytest.raises(MetricWeightsMissing, match="holds no ViT model"):
        get_backend("dino", {"dino_weights": str(tmp_path)})


def test_lpips_trunk_is_found_in_the_torch_hub_cache(offline, tmp_path):
    import torchvision

    trunk = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    backend = get_backend("lpips", cache_dir=tmp_path, size=64)
    assert torch.equal(getattr(backend.model.net.slice2, "3").weight, trunk["features.3.weight"])
