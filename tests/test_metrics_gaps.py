"""engine.metrics.gaps: MSGR and MRSGR on hand-computed values, undefined cases, and from image sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.metrics.gaps import gap_ratio, mrsgr, mrsgr_images, msgr, msgr_images

# ----------------------------------------------------------------------------------------------- MSGR on numbers


def test_msgr_hand_computed():
    # terms: 100 (0.8 - 0.6) / 0.8 = 25;  100 (0.5 - 0.55) / 0.5 = -10;  100 (0.9 - 0) / 0.9 = 100
    m = msgr({"a": (0.8, 0.6), "b": (0.5, 0.55), "c": (0.9, 0.0)}, metric="clip", step=400)
    assert [t.concept for t in m.terms] == ["a", "b", "c"]
    assert [t.gap for t in m.terms] == pytest.approx([25.0, -10.0, 100.0])
    assert m.value == pytest.approx(115.0 / 3)
    assert (m.metric, m.step, m.note, m.random_init) == ("clip", 400, None, False)
    assert m.terms[0].attacked == 0.8 and m.terms[0].immunized == 0.6


@pytest.mark.parametrize(
    "attacked, immunized, expected",
    [
        (0.6, 0.0, 100.0),  # perfect: nothing of the concept is left after the attack
        (0.6, 0.6, 0.0),  # none: the immunized model learns it exactly as well
        (0.5, 0.6, -20.0),  # negative: the immunized model learns it better
        (0.75, 0.5, 100 / 3),
    ],
)
def test_msgr_perfect_none_negative(attacked, immunized, expected):
    assert msgr({"x": (attacked, immunized)}).value == pytest.approx(expected)


def test_msgr_zero_denominator_is_undefined_not_a_crash():
    m = msgr({"ok": (0.8, 0.4), "dead": (0.0, 0.1)})
    assert m.value is None
    assert "dead" in m.note and "= 0" in m.note and "1 of 2" in m.note
    assert m.terms[0].gap == pytest.approx(50.0) and m.terms[1].gap is None
    assert "M(x^r, x^A) = 0" in m.terms[1].note


def test_msgr_accuracy_kind_names_accuracies():
    m = msgr({"ringo": (0.0, 0.0)}, kind="accuracy", metric="judge-acc")
    assert m.value is None and "acc(x^A) = 0" in m.note
    # judge-acc: acc(x^A) = 0.9, acc(x^T) = 0.3 -> 100 * 0.6 / 0.9
    assert msgr({"ringo": (0.9, 0.3)}, kind="accuracy").value == pytest.approx(200 / 3)


def test_msgr_empty_nan_and_negative_denominator():
    assert msgr({}).value is None and "no concepts" in msgr({}).note
    assert msgr({"x": (float("nan"), 0.5)}).value is None
    assert msgr({"x": (0.5, float("inf"))}).value is None
    neg = msgr({"x": (-0.5, -0.25)})  # exactly as defined: 100 (-0.5 + 0.25) / -0.5 = 50, with a caveat
    assert neg.value == pytest.approx(50.0) and "not meaningful" in neg.note


def test_gap_ratio():
    assert gap_ratio(4.0, 3.0) == (25.0, None)
    value, note = gap_ratio(0.0, 1.0, "D")
    assert value is None and note == "undefined: D = 0"


# ----------------------------------------------------------------------------------------------- MRSGR on numbers


def test_mrsgr_hand_computed():
    # M_target = (0.2 + 0.4) / 2 = 0.3;  M_other = (0.8 + 0.6 + 0.7) / 3 = 0.7;  100 (0.7 - 0.3) / 0.7
    r = mrsgr({"t1": 0.2, "t2": 0.4}, {"o1": 0.8, "o2": 0.6, "o3": 0.7}, metric="dino", step=40)
    assert r.target_mean == pytest.approx(0.3) and r.other_mean == pytest.approx(0.7)
    assert r.value == pytest.approx(400 / 7)
    assert [(t.concept, t.target) for t in r.terms] == [("t1", True), ("t2", True), ("o1", False), ("o2", False),
                                                         ("o3", False)]
    assert (r.metric, r.step, r.note) == ("dino", 40, None)


@pytest.mark.parametrize(
    "target, other, expected",
    [
        (0.0, 0.8, 100.0),  # perfect: targets unlike the original's, others identical to it
        (0.8, 0.8, 0.0),  # none: targets as learnable as the others
        (0.9, 0.6, -50.0),  # negative: the immunized model damaged the others more than the targets
    ],
)
def test_mrsgr_perfect_none_negative(target, other, expected):
    assert mrsgr({"t": target}, {"o": other}).value == pytest.approx(expected)


def test_mrsgr_undefined_cases():
    zero = mrsgr({"t": 0.5}, {"o1": 0.25, "o2": -0.25})
    assert zero.value is None and zero.other_mean == 0.0 and "M̄_other(x^I, x^A) = 0" in zero.note
    no_others = mrsgr({"t": 0.5}, {})
    assert no_others.value is None and no_others.other_mean is None and "no other concepts" in no_others.note
    assert "no target concepts" in mrsgr({}, {"o": 0.5}).note


# ----------------------------------------------------------------------------------------------- from images


def _images(*angles_deg: float) -> np.ndarray:
    """One 4x4 image per angle; the first pixel's red value carries the angle (in degrees) for the stub backend."""
    out = np.zeros((len(angles_deg), 4, 4, 3), np.uint8)
    for i, a in enumerate(angles_deg):
        out[i, 0, 0, 0] = int(a)
    return out


class AngleBackend:
    """A hand-made similarity: feature = (cos a, sin a) with a read from the image, so M = mean cos(a_i - b_j)."""

    name, kind, label, random_init = "angle", "similarity", "angle", False

    def features(self, images: np.ndarray) -> torch.Tensor:
        a = torch.tensor(images[:, 0, 0, 0], dtype=torch.float64) * math.pi / 180
        return torch.stack([a.cos(), a.sin()], dim=1)

    def pair_matrix(self, a, b) -> torch.Tensor:
        return self.features(a) @ self.features(b).T

    def mean_similarity(self, a, b) -> float:
        return float(self.pair_matrix(a, b).mean())


class LabelBackend:
    """A hand-made accuracy backend: an image's label is its first red value; concept n is recognised as CODES[n]."""

    name, kind, label, random_init = "label-acc", "accuracy", "label-acc", True
    CODES = {"t": 1, "o": 2}

    def accuracy(self, images, concept) -> float:
        return float(np.mean(images[:, 0, 0, 0] == self.CODES[concept]))

    def agreement(self, a, b, concept) -> float:
        return float(np.mean(a[:, 0, 0, 0][:, None] == b[:, 0, 0, 0][None, :]))


def test_msgr_images_hand_computed():
    b = AngleBackend()
    refs = {"t": _images(0, 0)}
    attacked = {"t": _images(0, 60)}  # M(x^r, x^A) = mean(cos 0, cos 60) = 0.75
    immunized = {"t": _images(60, 90)}  # M(x^r, x^T) = mean(cos 60, cos 90) = 0.25
    m = msgr_images(b, refs, attacked, immunized, ["t"], step=3)
    assert m.terms[0].attacked == pytest.approx(0.75) and m.terms[0].immunized == pytest.approx(0.25)
    assert m.value == pytest.approx(100 * 0.5 / 0.75)
    assert (m.metric, m.step, m.kind) == ("angle", 3, "similarity")
    with pytest.raises(KeyError, match="reference"):
        msgr_images(b, {}, attacked, immunized, ["t"])


def test_mrsgr_images_hand_computed():
    b = AngleBackend()
    attacked = {"t": _images(0), "o": _images(0, 0)}
    immunized = {"t": _images(90), "o": _images(0, 60)}  # M_t = cos 90 = 0;  M_o = (1 + 0.5) / 2 = 0.75
    r = mrsgr_images(b, attacked, immunized, ["t"], ["o"])
    assert r.target_mean == pytest.approx(0.0, abs=1e-12) and r.other_mean == pytest.approx(0.75)
    assert r.value == pytest.approx(100.0)


def test_accuracy_backend_msgr_and_mrsgr():
    b = LabelBackend()
    attacked = {"t": _images(1, 1, 1, 0), "o": _images(2, 2)}  # acc(x^A_t) = 0.75
    immunized = {"t": _images(1, 0, 0, 0), "o": _images(2, 0)}  # acc(x^T_t) = 0.25
    m = msgr_images(b, None, attacked, immunized, ["t"])
    assert m.kind == "accuracy" and m.random_init is True
    assert (m.terms[0].attacked, m.terms[0].immunized) == (0.75, 0.25)
    assert m.value == pytest.approx(100 * 0.5 / 0.75)
    # agreement: t: pairs (x^I, x^A) with the same label: 1 vs {1,1,1,0} -> 3, 0 x3 vs {..., 0} -> 3; 6 / 16
    #            o: {2, 0} vs {2, 2} -> 2 / 4
    r = mrsgr_images(b, attacked, immunized, ["t"], ["o"])
    assert r.target_mean == pytest.approx(6 / 16) and r.other_mean == pytest.approx(0.5)
    assert r.value == pytest.approx(100 * (0.5 - 0.375) / 0.5)
