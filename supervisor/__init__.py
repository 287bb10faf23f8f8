"""magvit-supervise: babysit a long job (SPEC.md); and magvit-report, which reads what it left.

The run itself lives at this level, one job a module:
  cli        argv -> exit status (the only sys.exit)      config   the option table, validation
  supervise  attempts, restarts, the exit record          attempt  one launch: the event loop
  child      spawn, signal and reap the process tree      signals  the signals we receive
  policy     restart or give up, back-off (pure)          ladder   TERM, ABRT, KILL timing (pure)

and each concern has a room of its own:
  watch/      what counts as progress and when it is late (pure decisions, the progress files)
  output/     where every byte and line goes (terminal, --log, --events, alert hooks, formats)
  forensics/  what a stall or an ending leaves behind (diagnosis, flight recorder, GPU holders)
  report/     magvit-report: reads a run's files, never writes them

Imports point down or sideways, never back up: watch/, output/, forensics/ and report/ never
import the run's modules (attempt, supervise, cli), and nothing here imports trainer or torch.
"""
