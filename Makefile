# Two commands on a fresh machine:  make run   (tokenize the embedded catalog)
#                                   make test  (the test suite)
# Each creates .venv and installs what it needs on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel by default; on a GPU machine: make TORCH_SPEC=torch FAISS=gpu ...
TORCH_SPEC ?= torch==2.13.0
FAISS ?= cpu
OUT ?= output/wikidata_films_kmeans
RAY_ADDRESS ?=

.PHONY: install run run-tiger test bench bench-kmeans bench-tiger bench-nightly bench-beam bench-stream bench-gpu bench-evaluate submit-train submit-nightly submit-evaluate clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(FAISS),test]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/semid train --data_path semid_dist/data/wikidata_films --output_dir $(OUT) \
	  --mode kmeans --n_layers 3 --n_clusters 256 --item_titles semid_dist/data/wikidata_films/items.parquet

run-tiger: install
	$(BIN)/semid train --data_path semid_dist/data/wikidata_films --output_dir output/wikidata_films_tiger \
	  --mode tiger --n_layers 3 --n_embed 256 --latent_dim 32 --epochs 50 --batch_size 256 \
	  --num_workers 2 --item_titles semid_dist/data/wikidata_films/items.parquet

# ruff first (lint and formatting), then the suite.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

# Submit to a running Ray cluster's job API (cluster/README.md: token auth, port-forward):
#   make submit-train RAY_ADDRESS=http://127.0.0.1:8265 ARGS="--data_path s3://... --output_dir s3://... --mode kmeans"
#   make submit-encode RAY_ADDRESS=... ARGS="--data_path s3://... --output_dir s3://... --tokenizer s3://.../final_model.pt"
.PHONY: submit-encode
submit-train: install
	$(if $(RAY_ADDRESS),,$(error set RAY_ADDRESS to the cluster's job API, e.g. http://127.0.0.1:8265))
	$(BIN)/ray job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python -m jobs.train $(ARGS)

submit-encode: install
	$(if $(RAY_ADDRESS),,$(error set RAY_ADDRESS to the cluster's job API, e.g. http://127.0.0.1:8265))
	$(BIN)/ray job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python -m jobs.encode $(ARGS)

#   make submit-nightly RAY_ADDRESS=... ARGS="--data_path s3://catalog/tonight/ --output_dir s3://semids/films"
submit-nightly: install
	$(if $(RAY_ADDRESS),,$(error set RAY_ADDRESS to the cluster's job API, e.g. http://127.0.0.1:8265))
	$(BIN)/ray job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python -m jobs.nightly $(ARGS)

#   make submit-evaluate RAY_ADDRESS=... ARGS="--run s3://semids/km --interactions s3://events/ --output_dir s3://evals/km"
submit-evaluate: install
	$(if $(RAY_ADDRESS),,$(error set RAY_ADDRESS to the cluster's job API, e.g. http://127.0.0.1:8265))
	$(BIN)/ray job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python -m jobs.evaluate $(ARGS)

clean:
	rm -rf output logs .pytest_cache

# Benchmarks (bench/, numbers in BENCHMARKS.md) on a synthetic catalog generated once under
# /tmp/bench:
#   make bench                  both below
#   make bench-kmeans           kmeans end to end vs a FAISS baseline, N = 1,000,000 (N=250000 quicker);
#                               SIDES=product skips the baseline (e.g. N=10000000 SIDES=product
#                               SHARDS=160: the driver's memory at catalog scale), FLAGS='--collision_policy
#                               relocate' passes flags to the product, IDS=string (with SIDES=product) a
#                               catalog of string ItemIDs ("SKU-%012d", 16 bytes; /tmp/bench/catalog_<N>_str)
#   make bench-tiger            tiger throughput, 1 and 2 workers, vs the same loop in memory
#                               (TIGER_ITEMS = 100,000 of the N-item catalog, 2 epochs)
#   make bench-nightly          the nightly job from and to S3 (a local SeaweedFS), three nights,
#                               the ID policy checked on what night 3 published
#   make bench-beam             beam search 1/4/8 against faiss's ResidualQuantizer (DATA=file.parquet,
#                               else the synthetic catalog)
#   make bench-stream DATA=...  the streamed k-means fit against the sample fit, seeds 42/1/2/3
#   make bench-gpu              on a machine with one NVIDIA GPU (bench/gpu.sh installs its own venv)
#   make bench-evaluate WHAT=speed|grid CATALOG=items.parquet EVENTS=interactions.parquet
#                               semid evaluate's wall time on one kmeans run, or the tokenizer grid
# Results (JSON + the table as Markdown) go to $(BENCH_OUT).
N ?= 1000000
TIGER_ITEMS ?= 100000
BENCH_OUT ?= bench_out
SIDES ?= product,baseline
SHARDS ?= 16
FLAGS ?=
IDS ?= int

bench: bench-kmeans bench-tiger

bench-kmeans: install
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/kmeans_bench.py --n $(N) --sides $(SIDES) --shards $(SHARDS) \
	  --id_type $(IDS) --product-flags "$(FLAGS)"

bench-tiger: install
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/tiger_bench.py --n $(N) --items $(TIGER_ITEMS)

bench-beam: install
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/beam_bench.py --n $(N) $(if $(DATA),--data $(DATA),)

bench-stream: install
	$(if $(DATA),,$(error set DATA to a catalog, e.g. DATA=items.parquet))
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/stream_bench.py --data $(DATA)

bench-nightly: install
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/nightly_bench.py --n $(N)

bench-evaluate: install
	$(if $(and $(CATALOG),$(EVENTS)),,$(error set CATALOG=embeddings.parquet and EVENTS=interactions.parquet))
	BENCH_OUT=$(BENCH_OUT) $(BIN)/python bench/evaluate_bench.py $(or $(WHAT),speed) --catalog $(CATALOG) \
	  --interactions $(EVENTS)

bench-gpu:
	BENCH_OUT=$(BENCH_OUT) N=$(N) bash bench/gpu.sh
