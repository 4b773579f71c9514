"""``mima tui``: a live Textual dashboard of run directories (reads events.jsonl, status.json, samples/).

* :mod:`~mima_cli.tui.data` folds events into what is drawn (no Textual);
* :mod:`~mima_cli.tui.watcher` follows the runs directory from a thread and posts typed messages;
* :mod:`~mima_cli.tui.widgets`, :mod:`~mima_cli.tui.screens`, :mod:`~mima_cli.tui.app` draw it;
* :mod:`~mima_cli.tui.demo` writes synthetic runs to try it on (``python -m mima_cli.tui.demo runs-demo``).

Textual and its plugins are imported only by ``mima tui`` itself, so ``mima --help`` stays fast.
"""
