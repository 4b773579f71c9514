"""``mima doctor``: what this machine can run, and what provides what is missing."""

from __future__ import annotations

import typer

from mima_cli.console import console, print_json
from mima_cli.options import JSON_OPTION


def doctor_cmd(json_out: bool = JSON_OPTION) -> None:
    """Torch and its devices, the weights in the local caches, and for each shipped profile whether it runs here
    and with which gradient modes; each missing piece with the one command that provides it. Never downloads.

    Example: mima doctor
    """
    from engine.doctor import diagnose, fits

    d = diagnose()
    if json_out:
        print_json(d.to_dict())
        return
    build = f"CUDA {d.cuda} build" if d.cuda else "CPU build"
    gpus = [x for x in d.devices if x["name"] != "cpu"]
    cpu = d.devices[0]
    console.print(f"torch {d.torch} ({build}); cpu: {cpu['cores']} cores, {cpu['threads']} torch threads; "
                  + (", ".join(f"{g['name']} {g['model']} {g['memory_gib']:.0f} GiB" for g in gpus) if gpus
                     else "no CUDA device"), highlight=False, soft_wrap=True)
    console.print("\n[bold]weights[/] (mima never downloads; each missing one with the command that fetches it)",
                  soft_wrap=True)
    for w in d.weights:
        mark = "[green]yes[/]" if w.present else "[red] no[/]"
        console.print(f"  {mark}  {w.name} ({w.what}): " + (w.where if w.present else f"[bold]{w.fix}[/]"),
                      highlight=False, soft_wrap=True)
    console.print("\n[bold]shipped profiles[/] (gradient modes that fit this machine for the largest group; the "
                  "profile's own in bold)", soft_wrap=True)
    for p in d.profiles:
        modes = ", ".join(("[bold]" + m + "[/]" if m == p.mode else m) for m, v in p.modes.items() if fits(v))
        mark = "[green]runs here[/]" if p.runs else "[red]does not run here[/]"
        console.print(f"  {p.name}: {mark} (base {p.base}; modes {modes or 'none'}, N = {p.group_size})",
                      highlight=False, soft_wrap=True)
        for line in p.missing:
            console.print(f"      {line}", highlight=False, soft_wrap=True)
    if d.pipelines:
        console.print(f"pipelines in the Hugging Face cache: {', '.join(d.pipelines)}", highlight=False)
    console.print(f"caches: {', '.join(f'{k} {v}' for k, v in d.caches.items())}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
