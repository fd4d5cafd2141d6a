"""`ray job submit` entrypoint for the nightly catalog tokenization (see semid_dist/commands/nightly.py).

    ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.nightly --data_path s3://bucket/catalog/ --output_dir s3://bucket/semid/

Flags are those of `semid nightly` (e.g. --generation, --retrain, --tokenizer, --changed_policy).
"""

import sys

from semid_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
