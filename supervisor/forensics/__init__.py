"""What a stall or an ending leaves behind, for the person who reads the log at 3 a.m. (SPEC 4, 4.1).

  diagnose         process tree, states, GPU memory and every thread's Python stack (py-spy)
  flight_recorder  NCCL flight-recorder dumps of a stalled job, and torchfrtrace's summary
  gpu_holders      processes outside the tree that still hold the GPU before a restart

May import: forensics/ itself, config and output/'s pure formats (lines, events). These modules
gather facts and return them; the run's loop decides what to do, and only it signals.
"""
