"""``mima bench``: step time and peak memory of immunization steps (random weights; no download)."""

from __future__ import annotations

import json

import typer

from mima_cli.console import console


def bench_cmd(
    arch: str = typer.Option("sd1", "--arch", help="sd1 (SD v1.4 UNet architecture) or sd2."),
    testbed: bool = typer.Option(False, "--testbed", help="The testbed UNet on the CPU instead."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda when present)."),
    n: list[int] = typer.Option([2, 3, 10], "--n", help="Numbers of concepts N (repeatable)."),
    modes: list[str] = typer.Option(["exact", "fd", "first-order"], "--mode", help="Gradient modes (repeatable)."),
    repeats: int = typer.Option(5, help="Timed steps per measurement (the median is reported)."),
    as_json: bool = typer.Option(False, "--json", help="Only the JSON lines."),
    agreement: bool = typer.Option(False, "--agreement", help="Instead: the cosine of the fd meta-gradient (bf16 on "
                                   "a GPU) and the exact one (fp32, classic attention) at the first --n."),
    latent: int = typer.Option(None, "--latent", help="Latent size of the --agreement check (default: the "
                               "architecture's; 32 fits an exact fp32 SD 1.x step for N = 2 on one 80 GB card) and "
                               "of --memory (default 8)."),
    memory: bool = typer.Option(False, "--memory", help="Instead: the bytes one step holds by component (float32 "
                                "on the CPU) for each --n and --mode, then the fitted memory model and its "
                                "prediction at 64x64 latents in bf16."),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="mima's fd and first-order steps with "
                                       "[immunize] gradient_checkpointing (block-wise)."),
    adam: str = typer.Option("auto", "--adam", help="--memory: [immunize] adam (auto, foreach, fused, for-loop)."),
    autocast: bool = typer.Option(False, "--autocast", help="--memory: with [immunize] autocast = \"bfloat16\"."),
) -> None:
    """Measure a plain fine-tuning step, the released code's alternating scheme, and mima's exact / fd /
    first-order steps for each N: one JSON line per measurement, then a table.

    Example: mima bench --testbed --n 2 --n 3; mima bench --memory --arch sd1 --n 1 --n 3 --mode fd --checkpointing
    """
    import torch

    from engine.bench import run
    from engine.immunize.core import ADAM_IMPLEMENTATIONS

    if adam not in ADAM_IMPLEMENTATIONS:
        raise typer.BadParameter(f"{adam!r}; expected one of {', '.join(ADAM_IMPLEMENTATIONS)}", param_hint="--adam")
    dev = device or ("cuda" if torch.cuda.is_available() and not testbed else "cpu")
    if memory:
        _memory_table("testbed" if testbed else arch, n, modes, latent or 8, as_json,
                      dict(checkpointing=checkpointing, adam=adam, autocast=autocast))
        return
    if agreement:
        from engine.bench import agreement as check

        typer.echo(json.dumps(check("testbed" if testbed else arch, dev, n[0], latent)))
        return
    rows = run("testbed" if testbed else arch, dev, tuple(n), tuple(modes), repeats,
               emit=lambda row: typer.echo(json.dumps(row)), checkpointing=checkpointing)
    if as_json:
        return
    from rich.table import Table

    table = Table(title=f"mima bench — {rows[0]['arch']} on {rows[0]['device']} (autocast {rows[0]['autocast']})")
    for col in ("step", "mode", "N", "seconds", "peak GiB"):
        table.add_column(col, justify="right" if col in ("N", "seconds", "peak GiB") else "left")
    for r in rows:
        table.add_row(r["name"], r["mode"], str(r["n"]), r.get("skipped") or f"{r['seconds']:.3f}",
                      "" if "skipped" in r else f"{r['peak_gib']:.1f}")
    console.print(table)


def _memory_table(arch: str, n: list[int], modes: list[str], latent: int, as_json: bool, switches: dict) -> None:
    from engine.bench import memory, memory_model

    rows = memory(arch, tuple(n), tuple(modes), latent, emit=lambda row: typer.echo(json.dumps(row)), **switches)
    models = memory_model(rows)
    for m in models:
        typer.echo(json.dumps(m))
    if as_json:
        return
    from rich.table import Table

    mib = 2**20
    table = Table(title=f"mima bench --memory — {arch}, {latent}x{latent} latents, MiB")
    for col in ("mode", "N", "params", "optimizer", "parameter-shaped", "k/v copies", "activations", "peak GiB"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], str(r["n"]), *(f"{r[k] / mib:.0f}" for k in ("params", "optimizer",
                      "parameter-shaped", "kv copies", "activations")), f"{r['peak'] / 2**30:.2f}")
    console.print(table)
    for m in models:
        pred = ", ".join(f"N = {k}: {v} GiB" for k, v in m["predicted_gib"].items() if v is not None)
        console.print(f"{m['mode']}: peak {m['constant']['peak'] / mib:.0f} + {m['per_concept']['peak'] / mib:.1f} N "
                      f"MiB" + (f"; predicted at 64x64 in bf16: {pred}" if pred else ""))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
