"""engine.runs: run directories, events, status, following a growing log."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from engine.profile import Profile, load_profile
from engine.runs import (
    EventFollower,
    EventLogger,
    MemoryLogger,
    NullLogger,
    RunNotFound,
    RunReader,
    RunWriter,
    find_run,
    list_runs,
    new_run_id,
    read_status,
)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_id_sorts_by_time_and_names_the_run():
    a = new_run_id("immunize", "mima", "g2-1", now=1_700_000_000)
    b = new_run_id("attack", "lora", None, now=1_700_000_001)
    assert a.startswith("20231114-221320-immunize-mima-g2-1-")
    assert sorted([b, a]) == [a, b]
    assert new_run_id("Attack", "Dream Booth", "g 1", now=0).startswith("19700101-000000-attack-dream-booth-g-1-")


def test_writer_creates_layout_and_resolved_profile(tmp_path):
    profile = load_profile("styles", overrides=["immunize.steps=5"])
    with RunWriter(tmp_path, "immunize", method="mima", group="g2-1", profile=profile, profile_name="styles") as run:
        assert (run.dir / "samples").is_dir() and (run.dir / "checkpoints").is_dir()
        assert read_status(run.dir)["state"] == "running"
    reader = RunReader(run.dir)
    assert reader.profile().model_dump() == profile.model_dump()
    assert reader.profile().immunize.steps == 5
    status = reader.status()
    assert status["state"] == "finished" and status["progress"] == 1.0
    assert (status["kind"], status["method"], status["group"], status["profile"]) == ("immunize", "mima", "g2-1", "styles")


def test_events_are_appended_one_per_line_with_schema(tmp_path):
    with RunWriter(tmp_path, "attack", method="lora") as run:
        run.set_phase("attack/lora")
        run.log_scalar("loss", 0.5, 1, concept="Van Gogh")
        run.log_metric("msgr/clip", 12.5, 400)
        run.log_status("halfway")
        run.progress(2, 4)
        path = run.events_path
        n_before = len(path.read_text().splitlines())
        run.log_scalar("loss", float("nan"), 2)
        assert len(path.read_text().splitlines()) == n_before + 1  # flushed per line
    events = lines(path)
    for e in events:
        assert {"t", "run", "phase", "step", "kind", "name"} <= set(e)
        assert e["run"] == run.id
    by_name = {(e["kind"], e["name"]): e for e in events}
    loss = next(e for e in events if e["name"] == "loss")
    assert loss["phase"] == "attack/lora" and loss["tags"] == {"concept": "Van Gogh"}
    assert by_name[("metric", "msgr/clip")]["value"] == 12.5
    assert by_name[("progress", "progress")]["value"] == 0.5 and by_name[("progress", "progress")]["total"] == 4
    assert [e["value"] for e in events if e["name"] == "state"] == ["running", "finished"]
    assert events[-2]["value"] != events[-2]["value"]  # NaN survives the round trip


def test_log_image_saves_png_and_logs_relative_path(tmp_path):
    src = tmp_path / "in.jpg"
    Image.new("RGB", (4, 4), "red").save(src)
    with RunWriter(tmp_path / "runs", "immunize") as run:
        p1 = run.log_image("sample/Van Gogh", 10, Image.new("RGB", (8, 8), "blue"))
        p2 = run.log_image("sample/Van Gogh", 10, src)
    assert p1 != p2 and p1.parent == run.dir / "samples"
    with Image.open(p2) as im:
        assert im.format == "PNG" and im.getpixel((0, 0))[0] > 200
    images = [e for e in lines(run.events_path) if e["kind"] == "image"]
    assert [run.dir / e["path"] for e in images] == [p1, p2]
    assert RunReader(run.dir).samples() == sorted([p1, p2])


def test_exception_marks_failed_and_interrupt_marks_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with RunWriter(tmp_path, "immunize") as failed:
            raise RuntimeError("out of memory\non step 3")
    status = read_status(failed.dir)
    assert status["state"] == "failed" and status["error"] == "RuntimeError: out of memory on step 3"
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(tmp_path, "attack") as stopped:
            raise KeyboardInterrupt
    assert read_status(stopped.dir)["state"] == "interrupted"
    assert lines(stopped.events_path)[-1]["value"] == "interrupted"


def test_link_fields_and_extra(tmp_path):
    parent = RunWriter(tmp_path, "immunize", method="mima")
    parent.finish()
    parent.close()
    base = RunWriter(tmp_path, "attack", method="lora", parent=None)
    with RunWriter(
        tmp_path,
        "attack",
        method="lora",
        group="g3-1",
        concepts=["Van Gogh", "Claude Monet"],
        parent=parent.id,
        twin=base.id,
        base_model_hash="abc123",
        extra={"seed": 1},
    ) as run:
        run.set_status(extra={"note": "x"})
        with pytest.raises(TypeError, match="unknown status field"):
            run.set_status(colour="red")
    base.close()
    status = read_status(run.dir)
    assert status["parent"] == parent.id and status["twin"] == base.id
    assert status["concepts"] == ["Van Gogh", "Claude Monet"]
    assert status["base_model_hash"] == "abc123" and status["extra"] == {"seed": 1, "note": "x"}
    assert find_run(tmp_path, status["parent"]) == parent.dir


def test_status_is_replaced_atomically(tmp_path):
    run = RunWriter(tmp_path, "immunize", status_interval=0.0)
    bad: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                json.loads(run.status_path.read_text())
            except json.JSONDecodeError as e:  # a partially written file
                bad.append(str(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(1, 301):
            run.progress(step, 300)
            run.set_status(extra={"padding": "x" * (step % 50) * 100})
    finally:
        stop.set()
        thread.join()
    run.close()
    assert not bad
    assert [p.name for p in run.dir.iterdir() if p.name.endswith(".tmp")] == []
    assert read_status(run.dir)["progress"] == 1.0


def test_follower_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    follower = EventFollower(path)
    assert follower.poll() == []  # file does not exist yet
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "scalar", "step": 1}) + "\n")
        f.flush()
        assert [e["step"] for e in follower.poll()] == [1]
        assert follower.poll() == []
        half = json.dumps({"kind": "scalar", "step": 2})
        f.write(half[:9])  # truncated last line
        f.flush()
        assert follower.poll() == []
        assert follower.skipped == 0
        f.write(half[9:] + "\n" + json.dumps({"kind": "scalar", "step": 3}) + "\n")
        f.flush()
        assert [e["step"] for e in follower.poll()] == [2, 3]
        f.write("{not json}\n" + json.dumps({"step": 4}) + "\n")
        f.flush()
        assert [e["step"] for e in follower.poll()] == [4]
        assert follower.skipped == 1


def test_follower_follows_a_live_writer(tmp_path):
    run = RunWriter(tmp_path, "immunize")
    follower = RunReader(run.dir).follow()
    seen = [e["name"] for e in follower.poll()]
    assert seen == ["state"]
    for step in range(3):
        run.log_scalar("loss", step, step)
        assert [e["value"] for e in follower.poll()] == [step]
    run.finish()
    run.close()
    assert [e["value"] for e in follower.poll()] == ["finished"]


def test_follower_restarts_when_file_is_replaced(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n')
    follower = EventFollower(path)
    assert len(follower.poll()) == 2
    path.write_text('{"n": 9}\n')
    assert follower.poll() == [{"n": 9}]


def test_list_runs_is_sorted_and_tolerant(tmp_path):
    assert list_runs(tmp_path / "missing") == []
    a = RunWriter(tmp_path, "immunize", run_id="20260101-000000-immunize-a")
    b = RunWriter(tmp_path, "attack", run_id="20250101-000000-attack-b")
    broken = tmp_path / "20270101-000000-broken"
    broken.mkdir()
    (broken / "status.json").write_text("{trunc")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "file.txt").write_text("x")
    runs = list_runs(tmp_path)
    assert [r["id"] for r in runs] == [b.id, a.id, broken.name]
    assert runs[-1]["state"] == "unknown" and "unreadable" in runs[-1]["error"]
    shutil.rmtree(a.dir)
    assert [r["id"] for r in list_runs(tmp_path)] == [b.id, broken.name]
    a.close()
    b.close()


def test_find_run_by_id_prefix_part_and_latest(tmp_path):
    a = RunWriter(tmp_path, "immunize", run_id="20260101-000000-immunize-mima-aaaa")
    b = RunWriter(tmp_path, "attack", run_id="20260102-000000-attack-lora-bbbb")
    assert find_run(tmp_path, a.id) == a.dir
    assert find_run(tmp_path, "20260102") == b.dir
    assert find_run(tmp_path, "mima") == a.dir
    assert find_run(tmp_path, "latest") == b.dir
    assert find_run(tmp_path, str(a.dir)) == a.dir
    with pytest.raises(RunNotFound, match="matches 2 runs"):
        find_run(tmp_path, "2026")
    with pytest.raises(RunNotFound, match="no run matches"):
        find_run(tmp_path, "zzz")
    a.close()
    b.close()


def test_latest_values(tmp_path):
    with RunWriter(tmp_path, "immunize") as run:
        for step in range(3):
            run.log_scalar("loss", step, step)
        run.log_metric("msgr/clip", 1.0, concept="a")
        run.log_metric("msgr/clip", 2.0, concept="b")
    latest = RunReader(run.dir).latest()
    assert latest["immunize:loss"]["value"] == 2
    assert latest["immunize:msgr/clip concept=b"]["value"] == 2.0


def test_loggers_implement_the_protocol():
    memory = MemoryLogger()
    for logger in (memory, NullLogger()):
        assert isinstance(logger, EventLogger)
        logger.log_scalar("loss", 1.5, 1)
        logger.progress(1, 2)
    assert memory.scalars("loss") == [1.5]


def test_profile_is_optional(tmp_path):
    with RunWriter(tmp_path, "evaluate") as run:
        pass
    assert not (run.dir / "profile.toml").exists()
    assert RunReader(run.dir).profile_text() is None
    with RunWriter(tmp_path, "evaluate", profile=Profile()) as run2:
        pass
    assert "[immunize]" in RunReader(run2.dir).profile_text()


# ------------------------------------------------------------------------- typed status, queries, old files

OLD_RUNS = Path(__file__).parent / "fixtures" / "runs_v0"
IMM, TWIN, MIMA, OLDER, EVAL = sorted(p.name for p in OLD_RUNS.iterdir())


def test_status_files_written_before_the_typed_layer_load():
    from engine.runs import RunStatus

    imm, twin, mima, older, ev = (RunStatus.of(read_status(OLD_RUNS / r)) for r in (IMM, TWIN, MIMA, OLDER, EVAL))
    assert imm.kind == "immunize" and imm.source.parent_model == "testbed" and imm.source.others == ["ringo", "cellini"]
    assert imm.utility.collapsed and imm.utility.share == 0.5 and imm.attack is None
    assert twin.attack.cache_keys["ringo"] == "k-ringo" and not twin.compared and twin.attack.twins[-1] == OLDER
    assert mima.compared and mima.attack.method == "mima" and mima.link("immunize_run") == IMM
    # the oldest format: keys missing or null read as their defaults, unknown keys are kept
    assert older.compared and older.attack.others == [] and older.attack.cache_keys == {}
    assert older.attack.control is False and older.attack.immunize_runs == [] and older.base_model_hash is None
    assert older.attack.to_dict()["retired_key"] == "kept as it was"
    assert ev.evaluation.attack_runs == [MIMA] and ev.link("model_run") is None


def test_status_with_wrong_types_reads_as_damaged():
    from engine.runs import RunStatus

    st = RunStatus.of({"id": "x", "state": "finished", "concepts": "not a list"})
    assert st.state == "unknown" and "concepts" in st.error


def test_queries_over_old_runs(tmp_path):
    from engine.attacks.cache import find_cached
    from engine.runs import Runs, children, newest, pairs, save_eval_images, update_status

    assert newest(OLD_RUNS, "immunize", group="g2").id == IMM
    assert newest(OLD_RUNS, "immunize", group="g3") is None
    assert newest(OLD_RUNS, "attack", where=lambda s: not s.compared).id == TWIN
    assert [s.id for s in children(OLD_RUNS, IMM, "immunize_run")] == [TWIN, MIMA, OLDER]
    assert [s.id for s in children(OLD_RUNS, TWIN, "twin")] == [MIMA, OLDER, EVAL]
    assert [s.id for s in children(OLD_RUNS, TWIN, "twin", kind="attack")] == [MIMA, OLDER]
    assert [s.id for s in Runs.scan(OLD_RUNS).children(MIMA, "parent", kind="evaluate")] == [EVAL]
    everything = pairs(OLD_RUNS)
    assert [(p.id, p.twin.name, p.targets, p.others) for p in everything] == [
        (MIMA, TWIN, ["strieker", "checkov"], ["ringo"]), (OLDER, TWIN, ["strieker", "checkov"], [])]
    assert [p.id for p in pairs(OLD_RUNS, [IMM])] == [MIMA, OLDER]
    assert [p.id for p in pairs(OLD_RUNS, [TWIN])] == [MIMA, OLDER]
    assert [p.id for p in pairs(OLD_RUNS, [EVAL])] == [MIMA]

    runs = tmp_path / "runs"
    shutil.copytree(OLD_RUNS, runs)
    import numpy as np

    for concept in ("strieker", "checkov", "ringo"):
        save_eval_images(runs / TWIN, concept, 2, np.zeros((1, 4, 4, 3), np.uint8), [100], "p")
    keys = {"strieker": "k-strieker", "checkov": "k-checkov", "ringo": "k-ringo"}
    assert find_cached(runs, keys) == (runs / TWIN, {c: runs / TWIN for c in keys})
    assert find_cached(runs, {**keys, "ringo": "other"})[0] is None
    new = update_status(runs / TWIN, twin="x", extra={"twins": ["x"]})
    assert new["extra"]["cache_keys"] == keys and read_status(runs / TWIN)["twin"] == "x"
    assert [p.name for p in (runs / TWIN / "eval" / "ringo").iterdir()] == ["step-000002.npz"]  # no temp file left
