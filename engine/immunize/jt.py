"""JT (joint): one lower-level task made of all concepts' data, a DreamBooth step on the mixed batch, no merge."""

from . import MethodSpec, register

register(MethodSpec("jt", "joint training baseline: one inner step on all concepts' data, no merge", tasks="joint",
                    merge=False))
