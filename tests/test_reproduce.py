"""``mima reproduce``'s task graph and its scheduler (no model: planning reads only the runs directory)."""

from __future__ import annotations

import pytest

from engine.profile import load_profile
from engine.reproduce import ReproduceLog, Task, _schedule, plan, plan_tasks


@pytest.fixture
def testbed():
    return load_profile("testbed")


def test_a_fresh_group_is_erase_immunize_twin_attacks_control(testbed, tmp_path):
    tasks, skipped = plan_tasks(testbed, plan(testbed, ["mima", "jt"], quick=True), tmp_path, "testbed")
    assert skipped == []
    deps = {t.key: t.deps for t in tasks}
    assert list(deps) == ["erase g3-1", "immunize g3-1 mima", "immunize g3-1 jt", "twin g3-1",
                          "attack g3-1 mima", "attack g3-1 jt", "control g3-1"]
    assert deps["immunize g3-1 jt"] == ("erase g3-1",)
    # the unimmunized model is attacked once, before any method's attack and the control reuse it from the cache
    assert deps["twin g3-1"] == ("immunize g3-1 mima",)
    assert deps["attack g3-1 jt"] == ("immunize g3-1 jt", "twin g3-1")
    assert deps["control g3-1"] == ("immunize g3-1 mima", "twin g3-1")


def test_parallel_workers_split_the_unimmunized_attack_by_concept(testbed, tmp_path):
    tasks, _ = plan_tasks(testbed, plan(testbed, ["mima"], quick=True), tmp_path, "testbed", twin_parts=2)
    deps = {t.key: t.deps for t in tasks}
    assert deps["twin g3-1 1/2"] == deps["twin g3-1 2/2"] == ("immunize g3-1 mima",)
    # one run assembled from the parts: the attacks and the control, running at once, compare with the same run
    assert deps["twin g3-1"] == ("immunize g3-1 mima", "twin g3-1 1/2", "twin g3-1 2/2")
    assert deps["attack g3-1 mima"] == deps["control g3-1"] == ("immunize g3-1 mima", "twin g3-1")


def test_without_erasing_the_immunizations_have_no_dependency(testbed, tmp_path):
    p = testbed.model_copy(update={"erase": testbed.erase.model_copy(update={"method": "none"})})
    tasks, _ = plan_tasks(p, plan(p, ["mima"], quick=True), tmp_path, "testbed")
    assert [t.key for t in tasks][0] == "immunize g3-1 mima" and tasks[0].deps == ()


class FakePool:
    """Runs nothing: records starts and finishes tasks in start order."""

    def __init__(self):
        self.started: list[str] = []
        self.running: list[Task] = []
        self.peak = 0

    def start(self, t: Task) -> None:
        self.started.append(t.key)
        self.running.append(t)
        self.peak = max(self.peak, len(self.running))

    def wait(self) -> tuple[Task, float]:
        return self.running.pop(0), 0.0


def test_the_scheduler_starts_ready_tasks_in_order_and_never_before_their_dependencies():
    a, b = Task("immunize", "g", "mima"), Task("immunize", "g", "jt")
    twin = Task("twin", "g", None, (a.key,))
    attack_a = Task("attack", "g", "mima", (a.key, twin.key))
    attack_b = Task("attack", "g", "jt", (b.key, twin.key))
    pool, log = FakePool(), ReproduceLog()
    _schedule([a, b, twin, attack_a, attack_b], pool.start, pool.wait, 2, lambda m: None, log)
    assert pool.started == [a.key, b.key, twin.key, attack_a.key, attack_b.key]
    assert pool.peak == 2
    assert log.done == [a.key, b.key, twin.key, attack_a.key, attack_b.key]

    pool = FakePool()
    _schedule([attack_a, a, twin], pool.start, pool.wait, 1, lambda m: None, ReproduceLog())
    assert pool.started.index(attack_a.key) > pool.started.index(twin.key) > pool.started.index(a.key)


def test_a_dependency_that_no_task_provides_is_an_error():
    orphan = Task("attack", "g", "mima", ("immunize g mima",))
    pool = FakePool()
    with pytest.raises(RuntimeError, match="unmet dependencies: attack g mima"):
        _schedule([orphan], pool.start, pool.wait, 2, lambda m: None, ReproduceLog())


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_a_bad_jobs_value_is_a_one_line_usage_error(jobs, tmp_path):
    from typer.testing import CliRunner

    from mima_cli.app import app

    res = CliRunner().invoke(app, ["--runs-dir", str(tmp_path), "reproduce", "--profile", "testbed", "--jobs", jobs])
    assert res.exit_code == 2
    assert f"--jobs '{jobs}': expected a positive number or 'auto'" in res.output
    assert "Traceback" not in res.output and list(tmp_path.iterdir()) == []
