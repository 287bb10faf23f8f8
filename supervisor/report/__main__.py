"""python -m supervisor.report: the same as the magvit-report command."""
import sys

from supervisor.report.cli import main

sys.exit(main())
