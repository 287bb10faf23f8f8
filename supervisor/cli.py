"""magvit-supervise: the command line. main(argv) -> int is the only place that exits."""
from __future__ import annotations

import os
import sys

from supervisor.config import ConfigError, HelpRequested, help_text, parse_config, usage
from supervisor.output.lines import printable

EXIT_SUPERVISOR_FAILED = 125


def _fail(message: str) -> int:
    try:
        os.write(2, f"magvit-supervise: {printable(message)}\n".encode("utf-8", "replace"))
    except OSError:
        pass
    return EXIT_SUPERVISOR_FAILED


def run(argv: list[str]) -> int:
    """Parse argv, supervise the command, and return the exit status."""
    try:
        config = parse_config(argv)
    except HelpRequested:
        try:
            sys.stdout.write(help_text())
            sys.stdout.flush()
        except OSError:
            pass
        return 0
    except ConfigError as e:
        return _fail(f"{e}\n{usage()}" if "no command" in str(e) else str(e))
    from supervisor import rundir
    from supervisor.supervise import Supervisor  # imported late: a bad option answers fast

    try:
        # The run folder locked for us alone, and the folders that do not answer (a hung mount) left out.
        settled = rundir.settle(config)  # its locks are held until we exit, however we do
        supervisor = Supervisor(settled.config)
    except rundir.InUse as e:
        return _fail(str(e))
    except OSError as e:
        where = e.filename if e.filename else "setup"
        return _fail(f"cannot open {where}: {e.strerror or e}")
    except ConfigError as e:  # found only when set up: a metrics port in use, prometheus-client missing
        return _fail(str(e))
    try:
        supervisor.settled(settled)
        return supervisor.run()
    except Exception as e:  # the supervisor's own failure: one line, status 125, the child is not left behind
        supervisor.abandon()
        return _fail(f"internal error: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    status = run(sys.argv[1:] if argv is None else argv)
    sys.exit(status)
