"""``python -m edge.cli``: the same entry point as the ``edge`` command."""

from edge.cli import main

main()
