"""CP (compose): per-concept k/v-only inner steps merged in closed form; everything else frozen (S^l = S^u = k/v)."""

from . import MethodSpec, register

register(MethodSpec("cp", "compose baseline: Custom-Diffusion-style k/v adaptation per concept, closed-form merge",
                    lower="xattn-kv", upper="xattn-kv"))
