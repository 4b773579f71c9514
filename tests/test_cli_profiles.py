"""The CLI skeleton: `mima profiles`, `mima runs`, error lines and exit codes (via CliRunner)."""

from __future__ import annotations

import json
import sys

import pytest
import typer
from typer.testing import CliRunner

from engine.profile import ProfileError
from engine.runs import RunWriter
from mima_cli import app as app_module
from mima_cli.app import MimaGroup, app, main, root
from mima_cli.options import explicit_flags, load_profile_for

runner = CliRunner()


def invoke(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def assert_one_error_line(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------- profiles


def test_validate_misspelt_key_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("[immunize]\nstepz = 3\n")
    result = invoke("profiles", "validate", "bad.toml")
    assert result.exit_code == 2
    assert_one_error_line(result, "bad.toml", "immunize.stepz", "'steps'")
    assert result.stdout == ""


def test_validate_wrong_type_names_field_and_type(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[attack]\nrank = "four"\n')
    result = invoke("profiles", "validate", str(bad))
    assert result.exit_code == 2
    assert_one_error_line(result, "bad.toml", "attack.rank", "integer")


def test_validate_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "sub" / "missing.toml"
    result = invoke("profiles", "validate", str(missing))
    assert result.exit_code == 2
    assert_one_error_line(result, str(missing), "no such file")


def test_validate_unknown_group_member_names_group_and_concept(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[concepts]]\nname = "Monet"\nprompt = "an artwork of Monet"\nclass_prompt = "artwork"\nkind = "style"\n'
        '[groups]\npair = ["Monet", "Manet2"]\n'
    )
    result = invoke("profiles", "validate", str(bad))
    assert result.exit_code == 2
    assert_one_error_line(result, "groups.pair", "'Manet2'")


def test_validate_toml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nseed = = 3\n")
    result = invoke("profiles", "validate", str(bad))
    assert result.exit_code == 2
    assert_one_error_line(result, f"{bad}:2:")


def test_validate_good_and_bad_files_together(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[immunize]\nsteps = 3\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[immunize]\nsteps = -1\n")
    result = invoke("profiles", "validate", str(good), str(bad))
    assert result.exit_code == 2
    assert "ok: " in result.stdout and "good.toml" in result.stdout
    assert_one_error_line(result, "bad.toml", "immunize.steps")
    as_json = invoke("profiles", "validate", str(good), str(bad), "--json")
    assert as_json.exit_code == 2
    assert [r["ok"] for r in json.loads(as_json.stdout)] == [True, False]


def test_validate_defaults_to_every_shipped_profile():
    result = invoke("profiles", "validate")
    assert result.exit_code == 0, result.output
    for name in ("styles", "objects", "personal"):
        assert f"{name}.toml" in result.stdout


def test_validate_applies_set_overrides(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("")
    result = invoke("profiles", "validate", str(good), "--set", "immunize.stepz=3")
    assert result.exit_code == 2
    assert_one_error_line(result, "immunize.stepz", "did you mean 'steps'?")


def test_list_shows_shipped_profiles():
    result = invoke("profiles", "list", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["styles"]["concepts"] == 8 and rows["styles"]["error"] is None
    table = invoke("profiles", "list")
    assert table.exit_code == 0 and "styles" in table.stdout


def test_show_prints_resolved_toml_with_overrides():
    result = invoke("profiles", "show", "styles", "--set", "immunize.steps=7")
    assert result.exit_code == 0
    assert "steps = 7" in result.stdout and 'base = "CompVis/stable-diffusion-v1-4"' in result.stdout
    as_json = invoke("profiles", "show", "objects", "--json")
    assert json.loads(as_json.stdout)["immunize"]["outer_lr"] == 3e-5


def test_show_unknown_name_is_exit_2():
    result = invoke("profiles", "show", "stylez")
    assert result.exit_code == 2
    assert_one_error_line(result, "stylez", "styles")


# -------------------------------------------------------------------------------------------- runs


def test_runs_list_and_show(tmp_path):
    with RunWriter(tmp_path, "immunize", method="mima", group="g2-1", concepts=["a", "b"]) as run:
        run.log_scalar("loss/upper", 0.25, 3)
    result = invoke("--runs-dir", str(tmp_path), "runs", "list", "--json")
    assert result.exit_code == 0
    assert [r["id"] for r in json.loads(result.stdout)] == [run.id]
    table = invoke("runs", "list", env={"MIMA_RUNS_DIR": str(tmp_path)})
    assert table.exit_code == 0 and "finished" in table.stdout and "mima" in table.stdout
    shown = invoke("--runs-dir", str(tmp_path), "runs", "show", "mima", "--json")
    data = json.loads(shown.stdout)
    assert data["status"]["group"] == "g2-1"
    assert data["latest"]["immunize:loss/upper"] == {"step": 3, "value": 0.25}
    text = invoke("--runs-dir", str(tmp_path), "runs", "show", "latest")
    assert text.exit_code == 0 and "g2-1" in text.stdout and "loss/upper" in text.stdout


def test_runs_show_unknown_run_is_one_line(tmp_path):
    result = invoke("--runs-dir", str(tmp_path), "runs", "show", "nope")
    assert result.exit_code == 2
    assert_one_error_line(result, "no runs")


def test_runs_list_empty(tmp_path):
    result = invoke("--runs-dir", str(tmp_path / "none"), "runs", "list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


# ------------------------------------------------------------------------------ errors, exit codes


def make_app(exc: BaseException) -> typer.Typer:
    """An app with the root's group and callback and one command that raises ``exc``."""
    test_app = typer.Typer(cls=MimaGroup, no_args_is_help=True)
    test_app.callback()(root)

    @test_app.command()
    def boom() -> None:
        raise exc

    @test_app.command()
    def fine() -> None:
        typer.echo("fine")

    return test_app


@pytest.mark.parametrize(
    ("exc", "code", "fragment"),
    [
        (ProfileError("unknown key 'x'", path="p.toml", field="immunize.x"), 2, "p.toml: immunize.x"),
        (RuntimeError("CUDA out of memory"), 1, "RuntimeError: CUDA out of memory"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_exceptions_become_one_line_and_exit_code(exc, code, fragment):
    result = runner.invoke(make_app(exc), ["boom"])
    assert result.exit_code == code
    assert_one_error_line(result, fragment)


def test_verbose_shows_traceback_of_unexpected_errors():
    result = runner.invoke(make_app(ValueError("bad value")), ["--verbose", "boom"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "error: ValueError: bad value" in result.stderr


def test_usage_error_is_exit_2():
    assert invoke("profiles", "validate", "--no-such-option").exit_code == 2
    assert invoke("no-such-command").exit_code == 2


def test_main_maps_exit_codes(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[immunize]\nstepz = 1\n")
    monkeypatch.setattr(sys, "argv", ["mima", "profiles", "validate", str(bad)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    monkeypatch.setattr(app_module, "app", make_app(KeyboardInterrupt()))
    monkeypatch.setattr(sys, "argv", ["mima", "boom"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 130
    monkeypatch.setattr(sys, "argv", ["mima", "fine"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)


# ------------------------------------------------------------------------------ flags precedence


def test_explicit_flags_only_apply_when_given(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("[immunize]\nsteps = 50\ninner_lr = 1e-4\n")
    seen = {}
    flag_app = typer.Typer(cls=MimaGroup)
    flag_app.callback()(root)

    @flag_app.command()
    def run(
        ctx: typer.Context,
        path: str,
        set_: list[str] = typer.Option([], "--set"),
        steps: int = typer.Option(1000),
        inner_lr: float = typer.Option(1e-5, "--inner-lr"),
    ) -> None:
        seen["flags"] = explicit_flags(ctx, {"steps": "immunize.steps", "inner_lr": "immunize.inner_lr"})
        p = load_profile_for(ctx, path, set_, {"steps": "immunize.steps", "inner_lr": "immunize.inner_lr"})
        seen["steps"], seen["inner_lr"] = p.immunize.steps, p.immunize.inner_lr

    result = runner.invoke(flag_app, ["run", str(profile), "--set", "immunize.steps=60"])
    assert result.exit_code == 0, result.output
    assert seen == {"flags": {}, "steps": 60, "inner_lr": 1e-4}  # defaults of flags do not win
    result = runner.invoke(flag_app, ["run", str(profile), "--set", "immunize.steps=60", "--steps", "70"])
    assert result.exit_code == 0, result.output
    assert seen["steps"] == 70 and seen["inner_lr"] == 1e-4


# ---------------------------------------------------------------------------------------- reliability


def test_set_errors_name_the_flag_not_the_file(tiny_profile):
    result = invoke("profiles", "validate", str(tiny_profile), "--set", "immunize.steps=0")
    assert result.exit_code == 2
    line = assert_one_error_line(result, "--set immunize.steps=0: immunize.steps:", "greater than or equal to 1")
    assert str(tiny_profile) not in line
    result = invoke("profiles", "validate", str(tiny_profile), "--set", "attack.lr=nan")
    assert result.exit_code == 2
    assert_one_error_line(result, "--set attack.lr=nan", "finite")
    (tiny_profile.parent / "inf.toml").write_text(tiny_profile.read_text().replace("outer_lr = 1e-3", "outer_lr = inf"))
    result = invoke("profiles", "validate", str(tiny_profile.parent / "inf.toml"))
    assert result.exit_code == 2
    assert_one_error_line(result, "inf.toml: immunize.outer_lr: expected a finite number, got inf")


@pytest.mark.parametrize("args, fragment", [
    (["runs", "show", "nope"], "no run"),
    (["immunize", "--resume", "nope"], "no run"),
    (["attack", "--run", "nope"], "no run"),
    (["report"], "no finished attack pairs"),
    (["generate", "--model", "no/such-model", "--prompt", "x", "--out", "o"], "no/such-model"),
    (["generate", "--device", "nonsense", "--prompt", "x", "--out", "o"], "nonsense"),
    (["immunize", "--device", "nonsense", "--set", "erase.method='none'"], "nonsense"),
])
def test_usage_errors_exit_2_in_every_command(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    result = invoke("--runs-dir", str(tmp_path / "runs"), *args)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("command, sections", [
    ("immunize", ["[model]", "[erase]", "[[concepts]]", "[regularization]", "[groups]", "[immunize]"]),
    ("erase", ["[model]", "[erase]", "[[concepts]]", "[groups]"]),
    ("reproduce", ["[model]", "[erase]", "[[concepts]]", "[regularization]", "[groups]", "[immunize]", "[attack]",
                   "[eval]"]),
])
def test_help_lists_the_profile_sections_read(command, sections):
    result = invoke(command, "--help", terminal_width=200)
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if "Profile sections read" in line)
    text = " ".join(result.output.split()).split("Profile sections read")[1]
    assert line and all(s in text for s in sections), text[:300]
