"""python -m supervisor: the same as the magvit-supervise command."""
from supervisor.cli import main

main()
