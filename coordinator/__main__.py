"""python -m coordinator: the command line."""

from coordinator.driver.cli import main

main()
