"""magvit-report RUN: what happened to a supervised run, in ten seconds (SPEC 10).

  cli      argv -> the text, --json or --png summary; exit status
  record   reads a run folder's files tolerantly, read-only
  summary  the summary, the timeline and the curves from a record (pure)
  goodput  where the run's time went: productive, startup, hung, recovery, redone (pure)
  stacks   the hung thread's innermost frame in a diagnosis' stacks (pure)
  plot     the picture (matplotlib, imported only for --png)

Reads files and never writes a run's files. May import: report/ itself, output/'s formats
(events, lines) and watch/'s pure parsers (eta, progress_files.read_regular); never the
run's loop, which may not even be installed where a report is read.
"""
