"""The sub-commands of ``semid``: each module's ``run(cfg, log_dir)`` does one command's work
inside a ``semid_dist.run.Run`` and returns its results dict.

  train.py    fit a tokenizer on the catalog, encode every item, publish the IDs
  encode.py   apply an existing tokenizer (--tokenizer) to a catalog
  nightly.py  write a new generation of IDs that keeps unchanged items' IDs
"""
