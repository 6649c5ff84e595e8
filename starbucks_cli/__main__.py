"""`python -m starbucks_cli` is the `starbucks` console script."""

from starbucks_cli import main

main()
