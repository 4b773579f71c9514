"""Image sets: a missing folder, an empty one or an unreadable image is reported before any work (naming the concept,
the file and the reason), by `mima profiles validate` and by every command that reads the set, and no run directory
is written first."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.image_sets import ImageSetError, check_image_sets, profile_image_sets, read_folder
from engine.profile import FolderImages, load_profile
from mima_cli.app import app

runner = CliRunner()


def _folder(root, name, n=2, corrupt=None):
    folder = root / name
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i:02d}.png")
    if corrupt:
        (folder / corrupt).write_bytes(b"not an image at all")
    return folder


@pytest.fixture()
def sets(tmp_path):
    return {"good": _folder(tmp_path, "good"), "empty": _folder(tmp_path, "empty", n=0),
            "corrupt": _folder(tmp_path, "corrupt", corrupt="01b.png"), "missing": tmp_path / "missing"}


def test_good_folder_is_read_and_counted(sets):
    assert check_image_sets([("x", FolderImages(folder=str(sets["good"])))]) == 2
    assert read_folder(sets["good"], 16).shape == (2, 16, 16, 3)


@pytest.mark.parametrize("which, reason", [("missing", "does not exist"), ("empty", "holds no images"),
                                           ("corrupt", "01b.png' is not a readable image")])
def test_bad_folder_names_field_file_and_reason(sets, which, reason):
    with pytest.raises(ImageSetError) as e:
        check_image_sets([("concepts.0.images.immunize (concept 'a')", FolderImages(folder=str(sets[which])))],
                         path="p.toml")
    msg = str(e.value)
    assert msg.startswith("p.toml: concepts.0.images.immunize (concept 'a'): ") and reason in msg
    if which == "corrupt":
        assert "not skipped" in msg and "cannot identify image file" in msg


def test_skip_past_the_end_says_so(sets):
    with pytest.raises(ImageSetError, match="after skipping 5 of 2"):
        check_image_sets([("x", FolderImages(folder=str(sets["good"]), skip=5))])


def test_profile_image_sets_name_concepts_and_class_prompts(tiny_profile):
    p = load_profile(tiny_profile)
    fields = [f for f, _ in profile_image_sets(p, ["checkov"], ("immunize",))]
    assert fields == ["concepts.1.images.immunize (concept 'checkov')", "regularization.images (class prompt 'artwork')"]
    assert len(profile_image_sets(p)) == 4 * 3 + 1  # every concept's three sets; one class prompt


def _set(sets, which, concept=0, key="immunize"):
    return f'concepts.{concept}.images.{key}={{folder = "{sets[which]}"}}'


@pytest.mark.parametrize("which", ["missing", "empty", "corrupt"])
def test_validate_checks_folders_of_a_profile_file(tiny_profile, sets, which):
    res = runner.invoke(app, ["profiles", "validate", str(tiny_profile), "--set", _set(sets, which)])
    assert res.exit_code == 2
    assert "concept 'strieker'" in res.output and str(sets[which]) in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    ok = runner.invoke(app, ["profiles", "validate", str(tiny_profile), "--set", _set(sets, "good")])
    assert ok.exit_code == 0 and "2 image files read" in ok.output
    skipped = runner.invoke(app, ["profiles", "validate", str(tiny_profile), "--set", _set(sets, which),
                                  "--no-check-images"])
    assert skipped.exit_code == 0


@pytest.mark.parametrize("command", [["immunize"], ["erase"], ["reproduce", "--quick", "--jobs", "1"]])
@pytest.mark.parametrize("which", ["missing", "empty", "corrupt"])
def test_commands_refuse_a_bad_image_set_before_any_run(tmp_path, tiny_profile, sets, command, which):
    runs = tmp_path / "runs"
    res = runner.invoke(app, ["--runs-dir", str(runs), *command, "--profile", str(tiny_profile),
                              "--set", _set(sets, which)])
    assert res.exit_code == 2, res.output
    assert "concept 'strieker'" in res.output and str(sets[which]) in res.output and "Traceback" not in res.output
    assert not runs.exists() or not any(runs.iterdir())  # no run directory (nor the UCE erase) was written


def test_attack_refuses_a_bad_attack_set_before_any_run(tmp_path, built, sets):
    from attack_helpers import attack_runs, copy_runs

    runs = copy_runs(built, tmp_path)
    before = sorted(p.name for p in runs.iterdir())
    res = runner.invoke(app, ["--runs-dir", str(runs), "attack", "--run", built["mima"],
                              "--set", _set(sets, "corrupt", concept=1, key="attack")])
    assert res.exit_code == 2, res.output
    assert "concept 'checkov'" in res.output and "01b.png" in res.output and "not skipped" in res.output
    assert sorted(p.name for p in runs.iterdir()) == before and len(attack_runs(runs)) == len(attack_runs(built["runs"]))
