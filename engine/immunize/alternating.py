"""``alternating`` — a labelled reproduction of the released MIMA code's scheme, kept ONLY for comparison.

Inner and outer steps alternate: each concept's inner step is applied to the model itself, the merged k/v are written
into the model without gradient, and the ascent step uses the first-order gradient at the resulting weights. It is
not Algorithm 1 (docs/method.md, "Baselines"): no gradient flows through the merge and inner updates accumulate in the model.
"""

from . import MethodSpec, register

register(MethodSpec("alternating", "REPRODUCTION of the released code's first-order alternating scheme (comparison only)",
                    algorithm="alternating"))
