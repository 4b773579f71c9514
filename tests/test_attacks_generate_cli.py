"""``mima generate`` on a tiny pipeline folder, through the real CLI (CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mima_cli.app import app


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from engine.testbed.build import TINY, build_random_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    build_random_pipeline(TINY, seed=0, tokenizer_folder=tmp_path_factory.mktemp("tok")).save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(*args):
    return CliRunner().invoke(app, ["generate", *args])


def test_generate_writes_pngs_and_metadata(pipe_dir, tmp_path):
    from engine.models import load_pipeline
    from engine.sampling import generate

    out = tmp_path / "set"
    common = ["--model", str(pipe_dir), "--prompt", "a photo of a cat", "--steps", "2", "--guidance", "2.0"]
    result = run(*common, "--n", "3", "--seed", "5", "--batch", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(d["file"], d["seed"], d["prompt"], d["steps"]) for d in lines] == [
        (f"{i:05d}.png", 5 + i, "a photo of a cat", 2) for i in range(3)
    ]
    images = np.stack([np.asarray(Image.open(out / d["file"])) for d in lines])
    expected = generate(load_pipeline(pipe_dir), "a photo of a cat", [5, 6, 7], 2, 2.0, batch=2)
    np.testing.assert_array_equal(images, expected)  # image i: seed + i

    again = run(*common, "--n", "1", "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    forced = run(*common, "--n", "1", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "metadata.jsonl"]


def test_generate_missing_model_is_one_line(tmp_path):
    result = run("--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2  # bad input, as an unknown run or a bad profile value
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]


def test_generate_accepts_a_run_id(built, tmp_path):
    """--model takes a run as its help says: its id (or `latest`) in --runs-dir, drawing the run's own model."""
    from engine.models import load_pipeline
    from engine.sampling import generate

    out = tmp_path / "set"
    result = CliRunner().invoke(app, ["--runs-dir", str(built["runs"]), "generate", "--model", built["mima"],
                                      "--prompt", "an artwork of strieker", "--n", "1", "--steps", "2", "--out",
                                      str(out)])
    assert result.exit_code == 0, result.output
    expected = generate(load_pipeline(built["runs"] / built["mima"]), "an artwork of strieker", [0], 2, 7.5)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000.png")), expected[0])
    unknown = CliRunner().invoke(app, ["--runs-dir", str(tmp_path / "empty"), "generate", "--model", "nope",
                                          "--prompt", "x", "--out", str(tmp_path / "o")])
    assert unknown.exit_code == 2 and "nope" in unknown.output
