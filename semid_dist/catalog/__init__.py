"""Catalog I/O: everything that reads the item embeddings.

schema.py    the data contract (columns, types, validation) and ``Catalog``: the files, their
             row counts and embedding size, and the storage they are on
source.py    the Ray Data source that streams parquet a few thousand rows at a time
plumbing.py  running a block function over the catalog (fused with the read) and collecting
             its small per-block results
scan.py      the scan pass: every row validated, every ItemID, the hash sample for a fit
encode.py    the encode pass: every item's codes, on CPUs or on one actor per GPU
stats.py     the streamed fit's per-code residual sums, one Ray task per read unit
names.py     string ItemIDs at the driver: one Arrow array sorted bytewise, ranks for the rules
"""
