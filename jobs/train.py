"""`ray job submit` entrypoint: train a tokenizer (tiger or kmeans) and export the IDs.

    ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.train --data_path s3://bucket/items/ --output_dir s3://bucket/tokenizers/km/ \
        --mode kmeans --n_layers 3 --n_clusters 256

Flags are those of `semid train`.
"""

import sys

from semid_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
