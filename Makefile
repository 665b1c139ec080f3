# One entry point per job. `make demo` and `make test` set themselves up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast mutations lint clean image manifests

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/docev run --config configs/tiny.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The developers' loop: everything but the tests marked slow (torchrun trainings, pipeline runs, compiles).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# Each bug the suite once let through, applied to a copy of the repository, must fail its tests (~20 min).
mutations: setup
	$(BIN)/python tests/mutations/mutation_check.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests

# The trainer/component image (CUDA torch from PyPI wheels); needs docker, which CI does not have.
IMAGE ?= ghcr.io/docev/docev-pipelines:0.1.0
image:
	docker build -f images/Dockerfile -t $(IMAGE) .

# The standalone PyTorchJobs and TrainJobs (manifests/jobs) and the TrainJobs' ClusterTrainingRuntimes
# (manifests/runtimes), rendered from the configs.
LOCAL_OVERRIDES := output_dir=/mnt/docev/runs/tiny kubernetes.wandb_secret=null train.resources.shm_size=2Gi
manifests: setup
	$(BIN)/docev render-manifests --config configs/docev_preview.yaml --out manifests/jobs/gpu-cluster
	$(BIN)/docev render-manifests --config configs/tiny.yaml --out manifests/jobs/local $(LOCAL_OVERRIDES)
	$(BIN)/docev render-manifests --config configs/docev_preview.yaml --backend trainjob \
	  --out manifests/jobs/gpu-cluster --runtime-out manifests/runtimes/gpu-cluster
	$(BIN)/docev render-manifests --config configs/tiny.yaml --backend trainjob \
	  --out manifests/jobs/local --runtime-out manifests/runtimes/local $(LOCAL_OVERRIDES)

clean:
	rm -rf outputs .pytest_cache
