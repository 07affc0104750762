"""`python -m distillery`: the command line, as the `distillery` script runs it."""

from distillery.cli import main

main()
