"""Storage, retries and publishing: where the run reads and writes, local or ``s3://``.

  storage.py   Storage: local paths and s3://, the S3 endpoint resolved once, input listing,
               the pyarrow S3 client, one-line S3 errors
  retry.py     the S3 retry budget (--s3_retry_budget_s): the one OutageClock, the backoff,
               what is worth retrying; per process for s3fs, per run for the read tasks
  s3client.py  the s3fs client whose requests run against that clock
  publish.py   Publisher: stage under a hidden prefix, publish, _SUCCESS last

Nothing here is imported by this file: a Ray Data read task imports storage and retry only,
not s3fs.
"""
