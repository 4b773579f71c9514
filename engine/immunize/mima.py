"""MIMA (Algorithm 1): per-concept inner steps on S^l, the closed-form k/v merge, ascent on S^u through the merge."""

from . import MethodSpec, register

register(MethodSpec("mima", "model immunization from a merged adaptation of all target concepts (Algorithm 1)"))
