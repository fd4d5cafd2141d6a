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

.PHONY: install run run-tiger test bench bench-gpu submit-train submit-nightly clean

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

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf output logs .pytest_cache
