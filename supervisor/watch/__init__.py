"""What counts as progress, and when it is late (SPEC 1.1-1.3).

  stall           is it a stall? (pure: observations and `now` in, a decision out)
  progress_files  scanning the progress files: changes, first lines, declared deadlines
  eta             fraction done and ETA from a progress file's fields or line (pure)
  rate            the progress rate and SLOW episodes against the run's typical rate (pure)

May import: only watch/ itself and the standard library. Nothing of output/ (a decision
never prints), forensics/ or the run's loop; the pure modules touch no clock and no disk.
"""
