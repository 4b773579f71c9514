"""`engine.bench` measures every step kind on the testbed UNet (CPU), and `mima bench --testbed` prints them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mima_cli.app import app


def test_bench_testbed_rows():
    from engine.bench import run

    rows = run("testbed", "cpu", ns=(2,), modes=("fd", "first-order"), repeats=1, warmup=0)
    names = [(r["name"], r["mode"], r["n"]) for r in rows]
    assert names == [("plain", "fine-tune", 1), ("alternating", "first-order", 3), ("mima", "fd", 2),
                     ("mima", "first-order", 2)]
    assert all(r["seconds"] > 0 and r["device"] == "cpu" for r in rows)
    # fd does strictly more passes than first-order on the same data
    fd, fo = rows[2]["seconds"], rows[3]["seconds"]
    assert fd > fo


def test_bench_cli_json_lines():
    res = CliRunner().invoke(app, ["bench", "--testbed", "--n", "2", "--mode", "first-order", "--repeats", "1",
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["plain", "alternating", "mima"]


def test_agreement_fd_follows_exact_where_first_order_does_not():
    """At an inner learning rate where the second-order term dominates, fd keeps the exact meta-gradient's direction
    and first-order loses it (testbed UNet, 8x8 latents, float32 on the CPU)."""
    from engine.bench import agreement

    row = agreement("testbed", "cpu", 2, latent=8, inner_lr=1.0)
    assert row["latent"] == 8 and row["fd"] == "fp32"
    assert row["cosine_fd_exact"] > 0.999
    assert row["cosine_first_order_exact"] < 0.9


def test_bench_cli_agreement_line():
    res = CliRunner().invoke(app, ["bench", "--testbed", "--agreement", "--n", "2", "--latent", "8"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert row["name"] == "agreement" and row["n"] == 2 and -1 <= row["cosine_fd_exact"] <= 1.000001


def test_bench_row_out_of_memory_is_recorded_and_the_rest_still_run(monkeypatch):
    """A row that runs out of GPU memory (fd at N = 10 on one H200) becomes a skipped row; the next rows still run."""
    import torch

    import engine.bench as bench

    calls, real = [], bench.measure

    def measure(fn, dev, repeats, warmup):
        calls.append(1)
        if len(calls) == 3:  # plain, alternating, then mima fd at N = 2
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(fn, dev, repeats, warmup)

    monkeypatch.setattr(bench, "measure", measure)
    rows = bench.run("testbed", "cpu", ns=(2,), modes=("fd", "first-order"), repeats=1, warmup=0)
    assert [(r["mode"], "skipped" in r) for r in rows[2:]] == [("fd", True), ("first-order", False)]
    assert rows[2]["skipped"].startswith("out of memory") and rows[3]["seconds"] > 0


def test_memory_rows_and_their_model():
    """``--memory`` counts one step's bytes by component on the CPU, the components at the peak add up to it, the
    model's lines go through the rows, and its N = 3 prediction at 64x64 is above the peak measured for N = 2 at 8x8."""
    from engine.bench import MODEL_COMPONENTS, memory, memory_model

    rows = memory("testbed", ns=(1, 2), modes=("first-order",), latent=8)
    assert [(r["mode"], r["n"]) for r in rows] == [("first-order", 1), ("first-order", 2)]
    for r in rows:
        assert r["peak"] > r["params"] > r["kv"] > 0 and r["activations"] > 0 and r["optimizer"] > 0
        assert sum(v for k, v in r["at_peak"].items() if k not in ("kv copies", "parameter-shaped")) \
            == r["peak"] - r["params"]
    (model,) = memory_model(rows)
    for r in rows:
        for k in MODEL_COMPONENTS:
            assert abs(model["constant"][k] + model["per_concept"][k] * r["n"] - r[k]) <= 2
    assert model["predicted_gib"][3] * 2**30 > rows[1]["peak"]


def test_memory_switches_change_what_the_step_holds():
    """``--checkpointing`` keeps far fewer activations for the same step; ``--autocast`` saves bf16 activations
    (the fp32 model is not scaled to them: no prediction); the model fits each switch setting apart."""
    from engine.bench import memory, memory_model

    plain = memory("testbed", ns=(1, 2), modes=("fd",), latent=8)
    ckpt = memory("testbed", ns=(1, 2), modes=("fd",), latent=8, checkpointing=True, adam="for-loop")
    mixed = memory("testbed", ns=(1, 2), modes=("fd",), latent=8, autocast=True)
    assert all(r["checkpointing"] and r["adam"] == "for-loop" for r in ckpt)
    for a, b, c in zip(plain, ckpt, mixed):
        assert b["activations"] < 0.5 * a["activations"], (a["activations"], b["activations"])
        assert b["parameter-shaped"] <= 1.02 * a["parameter-shaped"]  # no more weight copies
        assert c["autocast"] == "bf16" and c["activations"] != a["activations"]
    models = memory_model(plain + ckpt + mixed)
    assert [(m["checkpointing"], m["measured_autocast"]) for m in models] == [(False, "off"), (True, "off"),
                                                                                (False, "bf16")]
    assert models[1]["predicted_gib"][3] < models[0]["predicted_gib"][3]
    assert models[2]["predicted_gib"] == {3: None, 10: None}


def test_bench_cli_memory_table_and_bad_adam():
    res = CliRunner().invoke(app, ["bench", "--testbed", "--memory", "--n", "1", "--n", "2", "--mode", "first-order",
                                   "--checkpointing"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["memory", "memory", "memory-model"]
    assert all(r["checkpointing"] for r in rows)
    assert "predicted at 64x64 in bf16: N = 3:" in res.output
    res = CliRunner().invoke(app, ["bench", "--testbed", "--memory", "--adam", "fast"])
    assert res.exit_code == 2 and "--adam" in res.output and "fused" in res.output


def test_bench_checkpointing_applies_to_the_mima_steps_only():
    from engine.bench import run

    rows = run("testbed", "cpu", ns=(2,), modes=("fd",), repeats=1, warmup=0, checkpointing=True)
    assert [(r["name"], r["checkpointing"]) for r in rows] == [("plain", False), ("alternating", False),
                                                               ("mima", True)]
