"""``python -m mima_cli`` (also ``accelerate launch -m mima_cli immunize ...``): the ``mima`` command."""

from mima_cli.app import main

main()
