"""`python -m server.cli`: the same as the `fedfleet` command."""

from server.cli import main

main()
