"""`python -m mloc.cli`."""

from mloc.cli import main

main()
