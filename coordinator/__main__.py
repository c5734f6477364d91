"""python -m coordinator: the command line."""

from coordinator.cli import main

main()
