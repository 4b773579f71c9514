"""IMMA: immunize one concept (N = 1); the lower level is DreamBooth (``unet``) or Custom Diffusion (``xattn-kv``),
as ``[immunize] imma_adaptation`` says."""

from . import MethodSpec, register

register(MethodSpec("imma", "IMMA: single-concept immunization (the group's imma_concept or first target)",
                    tasks="single", merge=False))
