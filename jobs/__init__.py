"""Entry points for `ray job submit` (run from the repository root, which becomes the job's
working_dir on the cluster):

    ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.train  --data_path s3://... --output_dir s3://... --mode kmeans
    ... -- python -m jobs.encode --data_path s3://... --output_dir s3://... --tokenizer s3://.../final_model.pt
    ... -- python -m jobs.nightly ...

Each is `semid <command>` with the same flags. The job's driver runs on the cluster, where Ray
sets RAY_ADDRESS, so semid_dist joins the cluster instead of starting a local Ray. S3
credentials come from the nodes' environment (KubeRay Secret, instance profile), never from
the job's runtime_env.
"""
