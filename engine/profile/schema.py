"""The whole profile (:class:`Profile`) and its groups: the checks that span sections, and the helpers jobs call."""

from __future__ import annotations

import string
from dataclasses import dataclass

from pydantic import Field, model_validator

from .captions import read_captions, sample_captions
from .concepts import Concept, _overlap, _Strict
from .errors import ProfileError, _unknown
from .sections import (
    AttackSection,
    EraseSection,
    EvalSection,
    ImmunizeSection,
    ModelSection,
    RegularizationSection,
    UtilitySection,
)

__all__ = ["PROMPT_FIELDS", "Group", "Profile"]

PROMPT_FIELDS = ("name", "prompt", "token", "class_prompt")
"""Placeholders allowed in ``attack.eval_prompt``."""


@dataclass(frozen=True)
class Group:
    """A group of a profile: its targets (the concepts it lists) and the others (all the rest)."""

    name: str
    targets: tuple[Concept, ...]
    others: tuple[Concept, ...]

    @property
    def target_names(self) -> list[str]:
        return [c.name for c in self.targets]

    @property
    def other_names(self) -> list[str]:
        return [c.name for c in self.others]


class Profile(_Strict):
    """A whole profile. See the module docstring for the sections."""

    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    erase: EraseSection = Field(default_factory=EraseSection)
    concepts: list[Concept] = Field(default_factory=list)
    regularization: RegularizationSection = Field(default_factory=RegularizationSection)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    immunize: ImmunizeSection = Field(default_factory=ImmunizeSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    utility: UtilitySection = Field(default_factory=UtilitySection)

    @model_validator(mode="after")
    def _check(self) -> Profile:
        names = [c.name for c in self.concepts]
        seen: set[str] = set()
        tokens: dict[str, str] = {}
        for i, concept in enumerate(self.concepts):
            if concept.name in seen:
                raise ProfileError(f"duplicate concept name '{concept.name}'", field=f"concepts.{i}.name")
            seen.add(concept.name)
            if concept.token is not None:
                if concept.token in tokens:
                    raise ProfileError(
                        f"token '{concept.token}' is already used by concept '{tokens[concept.token]}'",
                        field=f"concepts.{i}.token",
                    )
                tokens[concept.token] = concept.name
            keys = ("immunize", "attack", "reference")
            for a_i, a in enumerate(keys):
                for b in keys[a_i + 1 :]:
                    why = _overlap(getattr(concept.images, a), getattr(concept.images, b))
                    if why:
                        raise ProfileError(
                            f"concept '{concept.name}': images.{a} and images.{b} must be disjoint: {why}",
                            field=f"concepts.{i}.images",
                        )
        for group, members in self.groups.items():
            if not members:
                raise ProfileError(f"group '{group}' lists no concepts", field=f"groups.{group}")
            for member in members:
                if member not in seen:
                    raise ProfileError(
                        f"group '{group}' names " + _unknown("concept", member, names),
                        field=f"groups.{group}",
                    )
            if len(set(members)) != len(members):
                raise ProfileError(f"group '{group}' lists a concept twice", field=f"groups.{group}")
        for member in self.erase.concepts:
            if member not in seen:
                raise ProfileError(
                    _unknown("concept", member, names), field="erase.concepts"
                )
        imma = self.immunize.imma_concept
        if imma is not None and imma not in seen:
            raise ProfileError(
                _unknown("concept", imma, names), field="immunize.imma_concept"
            )
        if self.attack.token is not None and self.attack.token in tokens:
            raise ProfileError(
                f"the attack token '{self.attack.token}' is the token of concept "
                f"'{tokens[self.attack.token]}'; the attacker must use a different token",
                field="attack.token",
            )
        if self.attack.eval_prompt is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.attack.eval_prompt) if f is not None}
            except ValueError as e:
                raise ProfileError(f"bad template: {e}", field="attack.eval_prompt") from None
            unknown = sorted(fields - set(PROMPT_FIELDS))
            if unknown:
                raise ProfileError(
                    f"unknown placeholder {{{unknown[0]}}} (use {', '.join('{' + f + '}' for f in PROMPT_FIELDS)})",
                    field="attack.eval_prompt",
                )
        for step in self.eval.steps:
            ok = [m for m in self.attack.methods if step in self.attack.settings(m).eval_steps]
            if len(ok) != len(self.attack.methods):
                bad = next(m for m in self.attack.methods if m not in ok)
                s = self.attack.settings(bad)
                raise ProfileError(
                    f"step {step} is not an evaluation step of attack '{bad}' "
                    f"(eval_every = {s.eval_every}, steps = {s.steps})",
                    field="eval.steps",
                )
        return self

    # -- helpers --------------------------------------------------------------------------------

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def concept(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise ProfileError(_unknown("concept", name, self.concept_names), field="concepts")

    def group(self, name: str) -> Group:
        """The targets (concepts the group lists, in its order) and the others (the rest, in profile order)."""
        if name not in self.groups:
            raise ProfileError(_unknown("group", name, self.groups), field="groups")
        members = self.groups[name]
        return Group(
            name=name,
            targets=tuple(self.concept(n) for n in members),
            others=tuple(c for c in self.concepts if c.name not in members),
        )

    def erase_targets(self, group: str | None = None) -> list[Concept]:
        """Concepts ``[erase]`` removes: ``erase.concepts``, or the targets of ``group`` when empty."""
        if self.erase.concepts:
            return [self.concept(n) for n in self.erase.concepts]
        return list(self.group(group).targets) if group is not None else list(self.concepts)

    def eval_steps(self, method: str) -> list[int]:
        """Attack steps reported for ``method``: ``eval.steps`` or its last step."""
        return list(self.eval.steps) or [self.attack.settings(method).steps]

    def regularization_captions(self) -> list[str]:
        """``regularization.n_captions`` captions sampled with ``model.seed``."""
        path = self.regularization.captions_path()
        return sample_captions(read_captions(path), self.regularization.n_captions, self.model.seed)
