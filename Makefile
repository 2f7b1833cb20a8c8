# An index of commands; logic lives in the package and scripts.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps CI light: the CI runners hold torch 2.13.0's CPU wheel on disk and reach
# no other index. Elsewhere, take it from torch's CPU index (PyPI's Linux torch brings CUDA, ~5 GB):
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu ...    GPU machines: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The tests run the Triton kernels in Triton's CPU interpreter, so the dev venv takes the gpu extra.
EXTRAS ?= dev,consumers,gpu
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu bench bench-gpu div-check lint samples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install
	$(BIN)/python samples/demo.py

test: install
	$(BIN)/python -m pytest -q -m "not gpu" tests

# On a GPU machine with torch and triton already there (the device machine): no venv.
test-gpu:
	python3 -m pytest -q -p no:cacheprovider -m gpu tests

# GB: size of the synthetic DeepSeek-shaped FP8 checkpoint the benchmark builds.
GB ?= 2.5

bench: install
	$(BIN)/python bench/bench_startup.py && $(BIN)/python bench/bench_convert.py --gb $(GB) \
		&& $(BIN)/python bench/bench_schemes.py

# REF: DeepSeek's inference/fp8_cast_bf16.py (with its kernel.py beside it), fetched for the run and
# never committed; when given, the end-to-end table times it in the same call.
bench-gpu:
	python3 bench/bench_kernels.py && python3 bench/bench_schemes.py --device cuda \
		&& python3 bench/bench_convert.py --device cuda --gb 8 --shard-gb 2 $(if $(REF),--reference-script $(REF))

# The quantizers' division against div.rn.f32 over every float32 significand pair (about a minute).
div-check:
	python3 bench/div_check.py

lint: install
	$(BIN)/ruff check fp8conv tests bench samples
	$(BIN)/ruff format --check fp8conv tests bench samples

samples: install
	$(BIN)/python samples/make_samples.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out samples/*-fp8-bf16 samples/*-bf16-fp8
