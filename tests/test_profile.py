"""engine.profile: schema, loading, overrides, error messages, round trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.profile import (
    FolderImages,
    GenerateImages,
    Profile,
    ProfileError,
    RenderImages,
    apply_flags,
    dump_profile,
    load_profile,
    parse_profile,
    read_captions,
    sample_captions,
    shipped_profiles,
    shipped_profiles_dir,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "profiles").glob("*.toml"))

TWO_CONCEPTS = """
[[concepts]]
name = "Alpha"
prompt = "an artwork of Alpha"
class_prompt = "artwork"
kind = "style"

[[concepts]]
name = "Beta"
prompt = "an artwork of Beta"
class_prompt = "artwork"
kind = "style"
"""


def error_of(text: str, **kwargs) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile(text, path="bad.toml", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------- shipped profiles


def test_profiles_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"styles", "objects", "personal"} <= names
    assert shipped_profiles_dir() == ROOT / "profiles"
    assert set(shipped_profiles()) == names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_profile_validates_and_round_trips(path):
    profile = load_profile(path)
    again = parse_profile(dump_profile(profile), path="dumped.toml")
    assert again.model_dump() == profile.model_dump()
    for group in profile.groups:
        g = profile.group(group)
        assert g.targets, group
        assert set(g.target_names).isdisjoint(g.other_names)
        assert len(g.targets) + len(g.others) == len(profile.concepts)


def test_styles_follows_the_paper():
    p = load_profile("styles")
    assert p.model.base == "CompVis/stable-diffusion-v1-4"
    assert p.erase.method == "uce"
    assert len(p.concepts) == 8
    assert p.concept("Van Gogh").prompt == "an artwork of Van Gogh"
    assert {c.class_prompt for c in p.concepts} == {"artwork"}
    sizes = sorted(len(v) for v in p.groups.values())
    assert sizes == [2] * 5 + [3] * 5
    assert p.group("g2-1").target_names == ["Claude Monet", "Kirbi Fagan"]
    assert (p.immunize.inner_lr, p.immunize.outer_lr, p.immunize.steps) == (1e-5, 3e-5, 1000)
    assert (p.immunize.lower_set, p.immunize.upper_set) == ("unet", "xattn")
    lora = p.attack.settings("lora")
    assert (lora.rank, lora.lr, lora.steps, lora.batch) == (4, 1e-4, 400, 4)
    assert p.eval_steps("lora") == [400]
    reg = p.regularization.images_for("artwork")
    assert isinstance(reg, GenerateImages) and (reg.prompt, reg.count) == ("artwork", 200)


def test_objects_and_personal_follow_the_paper():
    objects = load_profile("objects.toml")
    assert len(objects.concepts) == 10
    assert objects.concept("golf ball").prompt == "a photo of a golf ball"
    personal = load_profile("personal")
    assert len(personal.concepts) == 13
    assert personal.immunize.outer_lr == 2e-5
    assert set(personal.attack.methods) == {"textual-inversion", "dreambooth", "dreambooth-lora", "custom-diffusion"}
    assert personal.eval.steps == [40]
    tokens = {c.token for c in personal.concepts}
    assert len(tokens) == 13 and personal.attack.token not in tokens
    assert all(isinstance(c.images.attack, FolderImages) for c in personal.concepts)
    # the attacker's prompt swaps the immunization token for its own
    cat = personal.concept("pet_cat1")
    assert cat.format("{prompt}", token="qzv") == "a photo of qzv cat"


# ------------------------------------------------------------------------------------------ schema


def test_defaults_follow_paper():
    p = Profile()
    assert p.model.base == "testbed"
    assert p.immunize.method == "mima" and p.immunize.steps == 1000
    assert p.immunize.merge.anchor == "current"
    assert p.attack.methods == ["lora"] and p.attack.settings("lora").alpha == 4.0
    assert p.immunize.weight_decay == 0.0


def test_generate_prompt_defaults_to_concept_prompt():
    p = parse_profile(TWO_CONCEPTS)
    beta = p.concept("Beta")
    assert beta.images.immunize.prompt == "an artwork of Beta"
    assert isinstance(beta.images.reference, GenerateImages)


def test_image_set_kinds_are_told_apart_by_keys():
    text = TWO_CONCEPTS + """
[concepts.images]
immunize = { folder = "data/alpha" }
attack = { render = true, count = 5, seed = 100 }
reference = { prompt = "Beta painting", count = 3 }
"""
    beta = parse_profile(text).concept("Beta")
    assert isinstance(beta.images.immunize, FolderImages) and beta.images.immunize.source == "folder"
    assert isinstance(beta.images.attack, RenderImages) and list(beta.images.attack.seeds) == list(range(100, 105))
    assert beta.images.reference.source == "generate" and beta.images.reference.prompt == "Beta painting"


@pytest.mark.parametrize(
    "images",
    [
        'immunize = { folder = "data/x" }\nattack = { folder = "data/x/" }',
        "immunize = { count = 20, seed = 0 }\nattack = { count = 20, seed = 19 }",
        "immunize = { render = true, seed = 5 }\nattack = { render = true, seed = 0 }",
        'immunize = { folder = "d", count = 3 }\nattack = { folder = "d", skip = 2 }',
    ],
)
def test_immunize_and_attack_sets_must_be_disjoint(images):
    message = error_of(TWO_CONCEPTS + "\n[concepts.images]\n" + images + "\n")
    assert "images.immunize" in message and "images.attack" in message
    assert "Beta" in message and "bad.toml" in message


@pytest.mark.parametrize(
    "images",
    [
        'immunize = { folder = "d", count = 3 }\nattack = { folder = "d", skip = 3 }\nreference = { folder = "e" }',
        "immunize = { count = 20, seed = 0 }\nattack = { count = 20, seed = 20 }",
        'immunize = { count = 20, seed = 0 }\nattack = { prompt = "other", count = 20, seed = 0 }',
    ],
)
def test_disjoint_sets_are_accepted(images):
    parse_profile(TWO_CONCEPTS + "\n[concepts.images]\n" + images + "\n")


def test_group_targets_and_others():
    p = parse_profile(TWO_CONCEPTS + '\n[groups]\n"only beta" = ["Beta"]\nboth = ["Beta", "Alpha"]\n')
    g = p.group("only beta")
    assert g.target_names == ["Beta"] and g.other_names == ["Alpha"]
    assert p.group("both").target_names == ["Beta", "Alpha"] and p.group("both").others == ()
    with pytest.raises(ProfileError, match="did you mean 'both'"):
        p.group("bot")
    assert [c.name for c in p.erase_targets("only beta")] == ["Beta"]


def test_group_naming_unknown_concept_names_group_and_concept():
    message = error_of(TWO_CONCEPTS + '\n[groups]\ng7 = ["Alpha", "Gamma"]\n')
    assert "groups.g7" in message and "'Gamma'" in message and "bad.toml" in message


def test_unknown_concept_in_group_suggests_closest():
    assert "did you mean 'Alpha'?" in error_of(TWO_CONCEPTS + '\n[groups]\ng = ["Alpah"]\n')


def test_misspelt_key_suggests_closest():
    message = error_of("[immunize]\nstepz = 3\n")
    assert message == "bad.toml: immunize.stepz: unknown key 'stepz'; did you mean 'steps'?"


def test_misspelt_key_inside_image_set():
    message = error_of(TWO_CONCEPTS + "\n[concepts.images]\nimmunize = { cout = 3 }\n")
    assert "concepts.1.images.immunize.cout" in message and "did you mean 'count'?" in message


def test_misspelt_section_suggests_closest():
    assert "did you mean 'immunize'?" in error_of("[immunise]\nsteps = 3\n")


def test_wrong_type_names_field_and_expected_type():
    message = error_of('[immunize]\nsteps = "ten"\n')
    assert "immunize.steps" in message and "integer" in message and "'ten'" in message
    assert "boolean" in error_of("[attack]\nprior_preservation = 1\n")
    assert "attack.lr" in error_of("[attack]\nlr = [1]\n")


def test_wrong_choice_suggests_closest():
    message = error_of('[immunize]\nmethod = "mimma"\n')
    assert "immunize.method" in message and "did you mean 'mima'?" in message
    assert "model.device" in error_of('[model]\ndevice = "gpu"\n')
    parse_profile('[model]\ndevice = "cuda:1"\n')


def test_toml_syntax_error_names_file_and_line():
    assert error_of("[model]\nseed = 1\nbase = \n").startswith("bad.toml:3:")


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "gone.toml"
    with pytest.raises(ProfileError, match="gone.toml: no such file"):
        load_profile(missing)
    with pytest.raises(ProfileError, match="no shipped profile.*styles"):
        load_profile("stylez")


def test_cross_field_checks():
    assert "attack.token" in error_of(
        '[[concepts]]\nname = "c"\nprompt = "a sks cat"\ntoken = "sks"\nclass_prompt = "cat"\nkind = "personal"\n'
        '[attack]\ntoken = "sks"\n'
    )
    assert "does not appear in prompt" in error_of(
        '[[concepts]]\nname = "c"\nprompt = "a cat"\ntoken = "sks"\nclass_prompt = "cat"\nkind = "personal"\n'
    )
    assert "eval.steps" in error_of("[attack]\nsteps = 400\neval_every = 100\n[eval]\nsteps = [150]\n")
    assert "attack.eval_prompt" in error_of('[attack]\neval_prompt = "a photo of {tok}"\n')
    assert "duplicate concept" in error_of(TWO_CONCEPTS.replace('"Beta"', '"Alpha"'))
    assert "erase.concepts" in error_of('[erase]\nconcepts = ["Nobody"]\n')


# ----------------------------------------------------------------------------- loading and precedence


def test_shipped_name_lookup_with_and_without_suffix():
    assert load_profile("styles").model_dump() == load_profile("styles.toml").model_dump()


def test_local_file_wins_over_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("styles.toml").write_text('description = "mine"\n')
    assert load_profile("styles.toml").description == "mine"
    assert load_profile("styles").description != "mine"


def test_overrides_parse_toml_values_and_fall_back_to_strings(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(TWO_CONCEPTS + '[immunize]\nsteps = 7\n[model]\nbase = "testbed"\n')
    p = load_profile(
        path,
        overrides=[
            "immunize.steps=3",
            "immunize.inner_lr=2e-5",
            "model.base=CompVis/stable-diffusion-v1-4",
            'groups."g 1"=["Alpha"]',
            "attack.methods=['lora', 'dreambooth']",
            "concepts.1.prompt=an artwork of B",
        ],
    )
    assert p.immunize.steps == 3 and p.immunize.inner_lr == 2e-5
    assert p.model.base == "CompVis/stable-diffusion-v1-4"
    assert p.groups == {"g 1": ["Alpha"]}
    assert p.attack.methods == ["lora", "dreambooth"]
    assert p.concept("Beta").prompt == "an artwork of B"


def test_override_errors_are_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="expected KEY=VALUE"):
        parse_profile("", overrides=["immunize.steps"])
    with pytest.raises(ProfileError, match="immunize.stepz.*did you mean 'steps'"):
        parse_profile("", overrides=["immunize.stepz=3"])
    with pytest.raises(ProfileError, match="immunize.steps.*integer"):
        parse_profile("", overrides=["immunize.steps=many"])


def test_precedence_profile_then_set_then_flags(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[immunize]\nsteps = 7\ninner_lr = 1e-4\nouter_lr = 1e-4\n")
    p = load_profile(path, overrides=["immunize.inner_lr=2e-4", "immunize.outer_lr=3e-4"])
    p = apply_flags(p, {"immunize.outer_lr": 5e-4, "immunize.steps": None})
    assert p.immunize.steps == 7  # profile (flag not given)
    assert p.immunize.inner_lr == 2e-4  # --set
    assert p.immunize.outer_lr == 5e-4  # explicit flag beats --set


def test_apply_flags_validates_and_keeps_method_defaults():
    p = apply_flags(Profile(), {"immunize.method": "cp"})
    assert (p.immunize.lower_set, p.immunize.upper_set) == ("xattn-kv", "xattn-kv")
    assert apply_flags(p, {}) is p
    with pytest.raises(ProfileError, match="immunize.steps"):
        apply_flags(p, {"immunize.steps": "many"})


def test_dump_round_trip_with_every_image_kind(tmp_path):
    text = TWO_CONCEPTS + """
[concepts.images]
immunize = { folder = "data/b", count = 2 }
attack = { render = true, count = 5, seed = 100 }
[regularization]
images = { folder = "data/reg/{class_prompt}" }
[groups]
"g 1" = ["Beta"]
[attack.by_method.dreambooth]
lr = 5e-6
"""
    p = parse_profile(text)
    dumped = dump_profile(p, header="resolved by a test")
    assert dumped.startswith("# resolved by a test")
    path = tmp_path / "profile.toml"
    path.write_text(dumped)
    again = load_profile(path)
    assert again.model_dump() == p.model_dump()
    assert again.regularization.images_for("artwork").folder == "data/reg/artwork"
    assert again.attack.settings("dreambooth").lr == 5e-6 and again.attack.settings("lora").lr == 1e-4


# ----------------------------------------------------------------------------------------- captions


def test_captions_file_is_reproducible_from_its_script():
    script = ROOT / "engine" / "data" / "make_captions.py"
    spec = importlib.util.spec_from_file_location("make_captions", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert read_captions() == module.generate()
    assert len(set(read_captions())) >= 300


def test_captions_avoid_shipped_concepts():
    text = "\n".join(read_captions()).lower()
    for name in ("styles", "objects"):
        for concept in load_profile(name).concepts:
            assert concept.name.lower() not in text, concept.name


def test_caption_sampling_is_seeded():
    p = Profile()
    a = p.regularization_captions()
    assert len(a) == 200 and a == p.regularization_captions()
    assert sample_captions(read_captions(), 200, 1) != a


def test_non_finite_numbers_are_refused_in_the_file_and_in_overrides():
    for text, field in [("[immunize]\nouter_lr = inf\n", "immunize.outer_lr"), ("[model]\nguidance = nan\n", "model.guidance"),
                        ("[attack.by_method.lora]\nlr = -inf\n", "attack.by_method.lora.lr")]:
        with pytest.raises(ProfileError) as e:
            parse_profile(text, path="p.toml")
        assert str(e.value) == f"p.toml: {field}: expected a finite number, got {text.split('= ')[1].strip()}"
    with pytest.raises(ProfileError) as e:
        parse_profile("", path="p.toml", overrides=["immunize.inner_lr=nan"])
    assert str(e.value) == "--set immunize.inner_lr=nan: immunize.inner_lr: expected a finite number, got nan"


def test_imma_lora_adaptation_is_refused_not_silently_replaced():
    from engine.profile import ProfileError, load_profile

    with pytest.raises(ProfileError, match="imma_adaptation.*not implemented"):
        load_profile("testbed", ['immunize.imma_adaptation="lora"'])
    assert load_profile("testbed", ['immunize.imma_adaptation="xattn-kv"']).immunize.imma_adaptation == "xattn-kv"
