# The README's commands. Each target bootstraps .venv on its own first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Optional dependency groups of pyproject.toml: train (TensorFlow, plots), dev (tests, linters),
# ray (the cluster engine). The serving image installs none (make venv EXTRAS=), the indexer image only train.
EXTRAS ?= train,dev,ray
STAMP := $(VENV)/.installed-stamp

.PHONY: venv build run serve test test-unit lint fuzz bench bench-ray soak bench-slow-clients clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	@# opencv-python-headless (before TEBLID) and the contrib build share the cv2 folder: drop both, install one.
	@if $(BIN)/python -m pip show -q opencv-python-headless 2>/dev/null; then \
		$(BIN)/python -m pip uninstall -y -q opencv-python-headless opencv-contrib-python-headless; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

venv: $(STAMP)

## build: generate/train/index whatever is missing for IMGSEARCH_DATA and IMGSEARCH_PRESET
build: venv
	$(BIN)/imgsearch build

serve: venv
	$(BIN)/imgsearch serve

## run: build what is missing, then serve on IMGSEARCH_HOST:IMGSEARCH_PORT
run: build serve

## test: the whole test suite: lint, the import contract (layers, no cycles), then every test
test: lint
	$(BIN)/python -m pytest

## test-unit: the fast tests alone (no server, no browser, no container, no London data)
test-unit: lint
	$(BIN)/python -m pytest tests/unit

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

## fuzz: fuzz the upload decode path (fuzz/fuzz_decode.py) for FUZZ_SECONDS from the committed corpus (FUZZ_MERGE=1: merge back)
# New inputs go to FUZZ_CORPUS, findings (crash-, timeout-, oom- files) to FUZZ_FINDINGS, both outside git.
FUZZ_SECONDS ?= 3600
FUZZ_CORPUS ?= artifacts/fuzz-corpus
FUZZ_FINDINGS ?= artifacts/fuzz-findings
FUZZ_MERGE ?= 0
fuzz: venv
	mkdir -p $(FUZZ_CORPUS) $(FUZZ_FINDINGS)
	$(BIN)/python fuzz/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=$(FUZZ_FINDINGS)/ $(FUZZ_ARGS) $(FUZZ_CORPUS) fuzz/corpus/decode
	@# The first folder gets libFuzzer's new inputs; the committed one only what adds coverage to it.
	if [ "$(FUZZ_MERGE)" = 1 ]; then $(BIN)/python fuzz/fuzz_decode.py -merge=1 fuzz/corpus/decode $(FUZZ_CORPUS); fi

## bench: the benchmark suite on the London data and generated vectors (bench/results.json, BENCHMARKS.md; one-off studies: bench/studies/)
LONDON ?= ../shared/datasets/london
# The preset whose in-process floor the default's is compared with, query by query in turns: a ratio within one run,
# since hosts and minutes differ.
FLOOR_BASELINE ?= dense-rvlad-verify
BENCH_ARGS ?= --server-workers 1 2 3 --floor-baseline $(FLOOR_BASELINE)
bench: venv
	@# The load generator is Debian's wrk: installed here when missing and root; bench/run.py says so otherwise.
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }
	IMGSEARCH_DATA=$(LONDON) $(BIN)/imgsearch build
	IMGSEARCH_DATA=$(LONDON) IMGSEARCH_PRESET=$(FLOOR_BASELINE) $(BIN)/imgsearch build
	$(BIN)/python bench/run.py --data $(LONDON) $(BENCH_ARGS)
	$(BIN)/python bench/ray_bench.py --data $(LONDON) $(RAY_BENCH_ARGS)

## bench-ray: the Ray engine alone, against the embedded one (`ray` in bench/results.json, BENCHMARKS.md)
bench-ray: venv
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }
	IMGSEARCH_DATA=$(LONDON) $(BIN)/imgsearch build
	$(BIN)/python bench/ray_bench.py --data $(LONDON) $(RAY_BENCH_ARGS)

## soak: 50,000 mixed valid/invalid uploads, 32 clients: 0 x 5xx, RSS growth < 5% (`soak` in bench/results.json, BENCHMARKS.md)
soak: venv
	IMGSEARCH_DATA=$(LONDON) $(BIN)/imgsearch build
	$(BIN)/python bench/soak.py --data $(LONDON)

## bench-slow-clients: latency beside 1,000 held idle/slow connections, and time until the deadlines free them (`slow_clients` in bench/results.json, BENCHMARKS.md)
bench-slow-clients: venv
	IMGSEARCH_DATA=$(LONDON) $(BIN)/imgsearch build
	$(BIN)/python bench/slow_clients.py --data $(LONDON) $(SLOW_CLIENTS_ARGS)

clean:
	rm -rf $(VENV) artifacts
