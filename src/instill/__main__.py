"""`python -m instill` runs the command line."""

from instill.cli import main

main()
