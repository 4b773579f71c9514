"""Shared fixtures: a tiny random Stable Diffusion pipeline on disk and profiles that use it."""

from __future__ import annotations

import textwrap

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP threads that must wait for a busy core (another job on
# the machine) make every op up to 20x slower; one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline folder (64x64 images, text width 32) built in code."""
    from engine.testbed.build import TINY, build_random_pipeline

    folder = tmp_path_factory.mktemp("tiny-pipe")
    pipe = build_random_pipeline(TINY, seed=0, tokenizer_folder=folder / "_tok")
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


TINY_PROFILE = """
description = "tiny test profile"
[model]
base = "{base}"
device = "cpu"
seed = 0
sample_steps = 2
guidance = 2.0

[erase]
method = "uce"
preserve = ["a photo of a star"]

[regularization]
images = {{ render = true, count = 4, seed = 50000 }}
n_captions = 20

{concepts}

[groups]
g2 = ["strieker", "checkov"]
g1 = ["ringo"]

[immunize]
method = "mima"
steps = 2
inner_lr = 1e-3
outer_lr = 1e-3
resolution = 64
sample_every = 1
checkpoint_every = 1

[attack]
methods = ["lora"]
steps = 2
batch = 2
eval_every = 1
eval_images = 2

[eval]
metrics = ["judge", "judge-acc"]

[utility]
images = 2
captions = 1
"""


def concept_block(name: str) -> str:
    return textwrap.dedent(f"""
        [[concepts]]
        name = "{name}"
        prompt = "an artwork of {name}"
        class_prompt = "artwork"
        kind = "style"
        images.immunize = {{ render = true, count = 3, seed = 0 }}
        images.attack = {{ render = true, count = 3, seed = 10000 }}
        images.reference = {{ render = true, count = 3, seed = 20000 }}
    """)


@pytest.fixture()
def tiny_profile(tmp_path, tiny_pipeline_dir):
    """Path of a profile over the tiny pipeline with 4 testbed styles and groups g2 (2 targets) and g1."""
    concepts = "".join(concept_block(n) for n in ("strieker", "checkov", "ringo", "cellini"))
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PROFILE.format(base=tiny_pipeline_dir, concepts=concepts))
    return path


@pytest.fixture()
def one_thread():
    """One torch thread during a test, the previous count restored afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_pipeline_dir):
    """The attacked runs built once per session for the attack / evaluate / report tests
    (:func:`attack_helpers.attacked_runs`)."""
    from attack_helpers import attacked_runs

    return attacked_runs(tmp_path_factory, tiny_pipeline_dir)
