"""Write ``captions.txt``: generic image captions for the merge regulariser (``C_reg``).

The captions are combinations of generic subjects, places and picture types drawn with a fixed seed,
so the file is reproducible and needs no download. They deliberately avoid the concepts of the shipped
profiles (artists, Imagenette classes). Regenerate with::

    python engine/data/make_captions.py
"""

from __future__ import annotations

import random
from pathlib import Path

N_CAPTIONS = 300
SEED = 0

PICTURES = [
    "a photo of {s} {p}",
    "a close-up photo of {s} {p}",
    "a blurry photo of {s} {p}",
    "a black and white photo of {s} {p}",
    "a wide shot of {s} {p}",
    "a snapshot of {s} {p}",
    "an old photograph of {s} {p}",
    "a drawing of {s} {p}",
    "a watercolor painting of {s} {p}",
    "a sketch of {s} {p}",
    "a digital illustration of {s} {p}",
    "{s} {p}",
    "{s} {p} on a sunny day",
    "{s} {p} at night",
    "{s} {p} in the rain",
]

SUBJECTS = [
    "a man", "a woman", "a child", "an old man", "an old woman", "two friends", "a family",
    "a group of people", "a cyclist", "a runner", "a chef", "a musician", "a farmer", "a student",
    "a cat", "a dog", "a horse", "a cow", "a flock of birds", "a duck", "a rabbit", "a squirrel",
    "a red car", "a blue bicycle", "a yellow bus", "a small boat", "a train", "an airplane",
    "a wooden chair", "a sofa", "a table with plates", "a bowl of fruit", "a cup of coffee",
    "a plate of pasta", "a birthday cake", "a vase of flowers", "a potted plant", "a stack of books",
    "a laptop", "a backpack", "a pair of shoes", "an umbrella", "a clock", "a lamp",
    "a bridge", "a tall building", "a small house", "a lighthouse", "a fountain", "a tree",
    "a mountain", "a river", "a field of grass", "a sunset", "a snowy road", "a park bench",
]

PLACES = [
    "in a kitchen", "in a living room", "in an office", "in a classroom", "in a garden",
    "in a park", "on a city street", "on a beach", "in a forest", "on a mountain trail",
    "near a lake", "by the sea", "in a market", "at a train station", "in a parking lot",
    "in the snow", "in a field", "on a farm", "in a restaurant", "on a rooftop", "in a desert",
    "next to a window", "on a wooden table", "in front of a wall", "under a tree", "in the city",
]


def generate(n: int = N_CAPTIONS, seed: int = SEED) -> list[str]:
    """``n`` distinct captions, in a fixed order for a given seed."""
    rng = random.Random(seed)
    captions: list[str] = []
    seen: set[str] = set()
    while len(captions) < n:
        caption = rng.choice(PICTURES).format(s=rng.choice(SUBJECTS), p=rng.choice(PLACES))
        if caption not in seen:
            seen.add(caption)
            captions.append(caption)
    return captions


def main() -> None:
    out = Path(__file__).with_name("captions.txt")
    out.write_text("\n".join(generate()) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
