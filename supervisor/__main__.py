"""python -m supervisor: the same as the magvit-supervise command."""
from .cli import main

main()
