"""``textual-inversion``: a new token (the attacker's) whose input embedding is learned; nothing else trains.

The token is added to the tokenizer and initialised from the class word's embedding (the mean over its tokens).
Output: ``learned_embeds.safetensors`` (``{token: [1, c]}``, the format of diffusers' textual-inversion example)::

    pipe.load_textual_inversion(folder)        # weight_name defaults to learned_embeds.safetensors
"""

from __future__ import annotations

from pathlib import Path

from .common import AttackJob, Trainable, learn_new_token, register, save_token_embedding


def load_token_embedding(pipe, folder: Path) -> None:
    pipe.load_textual_inversion(folder, weight_name="learned_embeds.safetensors")


@register("textual-inversion")
class TextualInversion:
    adds_token = True
    # diffusers examples/textual_inversion (README): lr 5e-4, 3000 steps, batch 1 x 4 accumulation
    defaults = dict(steps=3000, lr=5e-4, batch=4, rank=4, alpha=4.0, prior_preservation=False)
    testbed_defaults = dict(steps=40, lr=5e-3, batch=1, rank=4, alpha=4.0, prior_preservation=False)

    def setup(self, pipe, job: AttackJob) -> Trainable:
        row, finish = learn_new_token(pipe, job, self.name)
        return Trainable(params=[row], text_trains=True, finish=finish)

    def save(self, pipe, job: AttackJob, folder: Path) -> None:
        save_token_embedding(pipe, job.token, folder)

    def load(self, pipe, folder: Path) -> None:
        load_token_embedding(pipe, folder)
