"""`ray job submit` entrypoint: train a small generative retriever on published IDs and report
Recall/NDCG against baselines (docs/evaluate.md).

    ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.evaluate --run s3://bucket/tokenizers/km/ --interactions s3://bucket/events/ \
        --output_dir s3://bucket/evaluations/km/

Flags are those of `semid evaluate`.
"""

import sys

from semid_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
