"""Where every byte and line goes: the terminal, --log, --events and the alert hooks (SPEC 3, 6).

  router    Output: one object the loop writes to; every sink fails soft (SPEC 4)
  terminal  the child's bytes to our stdout/stderr, bounded when a terminal stops reading
  assemble  bytes into timestamped, tagged log lines (\\r redraws, 64 KiB pieces)
  sinks     the --log and --events files, retried after a failure
  lines     every supervisor line, built from its event by a pure function; printable()
  events    event records and their strict-JSON encoding: the interface users parse
  alerts    --alert-cmd and --alert-webhook, off the loop and bounded
  metrics   --metrics-port and --metrics-file: a snapshot the loop publishes, read by threads
  ping      --ping-url: the dead-man's switch, one ping at a time from a thread

May import: output/ itself, config (the options) and child's small helpers (signal names,
pipe sizes). Never
watch/, forensics/ or the run's loop: they call in here, not the other way round.
"""
