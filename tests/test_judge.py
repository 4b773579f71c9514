"""Tests of the testbed judge (engine/testbed/judge/): input handling, persistence, metrics, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.testbed import judge as J
from engine.testbed.world import OBJECTS, PERSONAL, STYLES, Item, render_many


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def judge() -> J.Judge:
    torch.manual_seed(0)
    return J.Judge().eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return render_many([Item(style="ringo"), Item(object="star"), Item(personal="redstar")], seed=5)


# ----------------------------------------------------------------------------------------------- preprocess


def test_preprocess_numpy_uint8(judge, images):
    x = judge.preprocess(images)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), images / 255.0, atol=1e-6)
    one = judge.preprocess(images[0])  # a single HWC image
    assert one.shape == (1, 3, 64, 64) and torch.equal(one[0], x[0])
    small = judge.preprocess(np.zeros((2, 32, 48, 3), np.uint8) + 200)
    assert small.shape == (2, 3, 64, 64)
    assert torch.allclose(small, torch.full_like(small, 200 / 255), atol=1e-5)


def test_preprocess_pil_and_tensor_agree(judge, images):
    ref = judge.preprocess(images)
    pil = judge.preprocess([Image.fromarray(im) for im in images])
    assert torch.equal(pil, ref)
    # other modes are converted to RGB
    gray = judge.preprocess([Image.fromarray(images[0]).convert("L")])
    assert gray.shape == (1, 3, 64, 64) and torch.allclose(gray[0, 0], gray[0, 1])
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(judge.preprocess(t), ref)
    assert torch.equal(judge.preprocess(ref), ref)  # idempotent on canonical input
    assert torch.allclose(judge.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)), ref)  # uint8 tensor


def test_preprocess_resizes_with_antialias(judge, images):
    big = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    big = big.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 128x128, nearest upsampling
    x = judge.preprocess(big)
    assert x.shape == (3, 3, 64, 64)
    assert float((x - judge.preprocess(images)).abs().mean()) < 0.03
    # antialiasing: a 1-pixel checkerboard at 128x128 averages to grey instead of aliasing to black or white
    checker = ((torch.arange(128)[:, None] + torch.arange(128)[None]) % 2).float().expand(1, 3, 128, 128)
    assert torch.allclose(judge.preprocess(checker)[..., 2:-2, 2:-2], torch.tensor(0.5), atol=1e-4)
    pil = judge.preprocess([Image.fromarray(images[0]).resize((100, 90))])
    assert pil.shape == (1, 3, 64, 64)


def test_preprocess_rejects_bad_inputs(judge, images):
    with pytest.raises(ValueError):
        judge.preprocess(torch.rand(1, 3, 64, 64) * 2 - 1.0 - 0.6)  # [-1, 1]-style images
    with pytest.raises(ValueError):
        judge.preprocess(torch.rand(1, 64, 64, 3))  # channels last tensor
    with pytest.raises(TypeError):
        judge.preprocess(images.astype(np.float32))
    with pytest.raises(TypeError):
        judge.preprocess("not images")


def test_preprocess_keeps_gradients(judge):
    x = torch.rand(2, 3, 80, 80, requires_grad=True)
    judge.logits(x)["style"].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_outputs_shapes_and_model_size(judge, images):
    logits = judge.logits(images)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "style": (3, len(STYLES) + 1), "object": (3, len(OBJECTS) + 1), "personal": (3, len(PERSONAL) + 1)}
    f = judge.features(images)
    assert f.shape == (3, judge.config["feature_dim"])
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    c = judge.classify(images)
    assert all(v.dtype == torch.long and v.shape == (3,) for v in c.values())
    assert sum(p.numel() for p in judge.parameters()) * 2 < 2_000_000  # fp16 bytes


# ----------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(judge, images, tmp_path):
    path = tmp_path / "judge.safetensors"
    J.save_judge(judge, path)
    assert path.stat().st_size < 2_000_000
    loaded = J.load_judge_file(path)
    assert not loaded.training and loaded.config == judge.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        a, b = judge.logits(images), loaded.logits(images)
        # exactly the original model with its weights rounded to fp16
        rounded = J.Judge(**judge.config)
        rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in judge.state_dict().items()})
        rounded.eval()
        r = rounded.logits(images)
    for h in J.HEADS:
        assert torch.allclose(a[h], b[h], atol=2e-2, rtol=1e-2)
        assert torch.allclose(r[h], b[h], atol=1e-5)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        J.load_judge_file(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------------------------- metrics


class _Fixed(J.Judge):
    """A judge whose predictions are set by hand."""

    def __init__(self, preds: dict[str, list[int]], feats: torch.Tensor | None = None):
        super().__init__(widths=(8,), depths=(1,), feature_dim=4, neck_dim=4)
        self._preds = {k: torch.tensor(v) for k, v in preds.items()}
        self._feats = feats

    def classify(self, images, chunk=256):
        return self._preds

    def features(self, images, chunk=256):
        return self._feats[: len(images)]


def test_accuracy_counts_the_right_head():
    s, o, p = STYLES.index("wavell"), OBJECTS.index("fish"), [q.name for q in PERSONAL].index("greenfish")
    fixed = _Fixed({
        "style": [s, s, s, 0, len(STYLES)],
        "object": [o, 0, 0, 0, o],
        "personal": [p, p, len(PERSONAL), len(PERSONAL), len(PERSONAL)],
    })
    imgs = np.zeros((5, 64, 64, 3), np.uint8)
    assert J.accuracy(fixed, imgs, "wavell") == pytest.approx(3 / 5)
    assert J.accuracy(fixed, imgs, "fish") == pytest.approx(2 / 5)
    assert J.accuracy(fixed, imgs, "greenfish") == pytest.approx(2 / 5)
    assert J.accuracy(fixed, imgs, "ringo") == 0.0
    with pytest.raises(KeyError):
        J.accuracy(fixed, imgs, "artwork")
    with pytest.raises(ValueError):
        J.accuracy(fixed, imgs[:0], "fish")


def test_similarity_is_mean_pairwise_cosine(judge, images):
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]), dim=1)
    fixed = _Fixed({}, feats)
    # a = rows 0,1 ; b = rows 0,1,2 -> cosines [[1, 0, .707], [0, 1, .707]]
    assert J.similarity(fixed, images[:2], images) == pytest.approx((2 + 2 * 0.5**0.5) / 6, abs=1e-6)
    assert J.similarity(judge, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    s = J.similarity(judge, images, images[::-1])
    assert -1.0 <= s <= 1.0


# ----------------------------------------------------------------------------------------------- data, training


def test_training_batch_is_deterministic_and_mixed():
    a, la = J.training_batch(40, seed=3, step=7)
    b, lb = J.training_batch(40, seed=3, step=7)
    c, _ = J.training_batch(40, seed=3, step=8)
    assert a.shape == (40, 64, 64, 3) and a.dtype == np.uint8 and la.shape == (40, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    personal = la[:, 2] < len(PERSONAL)
    assert personal.sum() >= round(J.PERSONAL_EXTRA_SHARE * 40)  # boosted personal share, plus training_items' own
    compositions = (la[:, 0] < len(STYLES)) & (la[:, 1] < len(OBJECTS))
    assert compositions.sum() >= round(J.COMPOSITION_EXTRA_SHARE * 40)
    # hard negatives: images of a personal instance's object that are not personal instances
    shapes = [OBJECTS.index(p.object) for p in PERSONAL]
    assert (np.isin(la[:, 1], shapes) & ~personal).sum() >= 4


def test_augment_is_deterministic_and_in_range():
    x = J.Judge().preprocess(J.training_batch(16, 0, 0)[0])
    y1, g1 = J.augment(x, torch.Generator().manual_seed(1))
    y2, g2 = J.augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert y1.shape == x.shape and float(y1.min()) >= 0 and float(y1.max()) <= 1
    yg, gm = J.augment(x, torch.Generator().manual_seed(2), grayscale_p=1.0)
    assert bool(gm.all())
    # grayscale images keep at most the (per-channel) noise as colour
    assert float((yg[:, 0] - yg[:, 1]).abs().mean()) < 0.03


def test_warp_moves_pixels_by_at_most_its_amplitude():
    """The elastic warp is the identity at amplitude 0 and moves a vertical edge by no more than its amplitude."""
    x = torch.zeros(4, 3, 64, 64)
    x[..., 32:] = 1.0  # a vertical edge between columns 31 and 32
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(J._warp(x, torch.zeros(4), g), x, atol=1e-5)
    y = J._warp(x, torch.full((4,), 3.0), g)
    assert not torch.allclose(y, x, atol=1e-3)  # it does move the edge
    assert float(y[..., :28].max()) < 1e-5 and float(y[..., 36:].min()) > 1 - 1e-5


def test_inference_runs_in_eval_mode_and_restores_mode(images):
    m = J.Judge()
    m.train()
    before = _weights(m)
    m.classify(images)
    m.features(images)
    assert m.training
    assert all(torch.equal(v, before[k]) for k, v in _weights(m).items())  # running statistics untouched


def _weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_training_changes_weights_and_resumes_exactly(tmp_path):
    kw = dict(steps=4, batch=6, seed=11, model_config={"widths": (8, 16), "depths": (1, 1), "feature_dim": 16, "neck_dim": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        init = _weights(J.Judge(**kw["model_config"]))
    seen: list[int] = []
    full = J.train_judge(**kw, progress=lambda s, n, info: seen.append(s))
    assert seen == [1, 2, 3, 4]
    after = _weights(full)
    assert any(not torch.equal(init[k], after[k]) for k in init)
    assert not full.training

    class Stop(Exception):
        pass

    def stop_at_2(s, n, info):
        if s == 2:
            raise Stop

    ckpt = tmp_path / "judge.ckpt"
    with pytest.raises(Stop):
        J.train_judge(**kw, checkpoint_path=ckpt, checkpoint_every=2, progress=stop_at_2)
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    resumed_steps: list[int] = []
    resumed = J.train_judge(**kw, checkpoint_path=ckpt, checkpoint_every=2, progress=lambda s, n, i: resumed_steps.append(s))
    assert resumed_steps == [3, 4]
    for k, v in _weights(resumed).items():
        assert torch.equal(v, after[k]), k
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    # a finished checkpoint resumes to the finished model without training
    again = J.train_judge(**kw, checkpoint_path=ckpt, progress=lambda s, n, i: pytest.fail("trained again"))
    assert all(torch.equal(v, after[k]) for k, v in _weights(again).items())
    # resume=False starts over; a checkpoint of other settings is refused
    fresh: list[int] = []
    J.train_judge(**kw, checkpoint_path=ckpt, resume=False, progress=lambda s, n, i: fresh.append(s))
    assert fresh == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        J.train_judge(**{**kw, "seed": 12}, checkpoint_path=ckpt)


def test_extra_images_hook():
    calls: list[int] = []

    def extra(step):
        calls.append(step)
        imgs = np.zeros((2, 48, 48, 3), np.uint8)
        return imgs, [[len(STYLES), J.IGNORE, len(PERSONAL)], [0, 0, J.IGNORE]]

    cfg = {"widths": (8,), "depths": (1,), "feature_dim": 8, "neck_dim": 8}
    J.train_judge(steps=2, batch=4, seed=0, extra_images_fn=extra, model_config=cfg)
    assert calls == [0, 1]


def test_evaluate_judge_reports_all_metrics():
    small = J.Judge(widths=(8, 16), depths=(1, 1), feature_dim=8, neck_dim=8)
    r = J.evaluate_judge(small, n_per_class=1, seed=0)
    assert r["judge_n_images"] == len(J.evaluation_items()) == 88
    for key in ("judge_accuracy", "judge_exact_match", "judge_style_head_accuracy", "judge_object_head_accuracy",
                "judge_personal_head_accuracy", "judge_grayscale_style_accuracy", "judge_personal_recall",
                "judge_personal_near_miss_rejection", "judge_degraded_accuracy"):
        assert 0.0 <= r[key] <= 1.0, key
    heads = [r[f"judge_{h}_head_accuracy"] for h in J.HEADS]
    assert r["judge_accuracy"] == pytest.approx(sum(heads) / 3, abs=1e-6)
    assert r["judge_exact_match"] <= min(heads) + 1e-9
