"""`ray job submit` entrypoint: apply an existing tokenizer to a catalog and export the IDs.

    ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.encode --data_path s3://bucket/items/ --output_dir s3://bucket/ids/today/ \
        --tokenizer s3://bucket/tokenizers/km/final_model.pt

Flags are those of `semid encode` (semid_dist/commands/encode.py).
"""

import sys

from semid_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
