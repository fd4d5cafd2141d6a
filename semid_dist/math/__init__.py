"""Pure math: functions over tensors/arrays. No Ray, no file or network I/O.

Collectives are passed in as arguments (``all_reduce`` defaulting to a no-op) so the
same code runs in a unit test and under DDP.
"""
