# Two commands on a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPOSITORY ?= model_repository
DEFAULT_MODEL := $(REPOSITORY)/unet-shapes

.PHONY: setup tools run test test-slow test-images test-fleet test-batch lock screenshots lint bootstrap bench-peers bench-paper bench-auto bench-batch clean

# torch and torchvision go through pip on their own, pinned: pip takes them from this
# machine's disk; the rest of the project installs with its train and dev extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

setup: $(STAMP)

# Puts the default model that ships with the project (segserve/default_model) into the
# repository when it holds none, then serves on :8000. Nothing trains.
run: setup
	$(VENV)/bin/segserve init --repository $(REPOSITORY)
	$(VENV)/bin/segserve serve --repository $(REPOSITORY) --host 0.0.0.0 --port 8000

# Rebuilds the default model from scratch (data, the shipped recipe, export as the next
# version): it says first what that costs on this machine. Hours on a 2-core CPU.
bootstrap: setup
	$(VENV)/bin/segserve bootstrap --repository $(REPOSITORY) --work-dir .

# From Debian's packages, for the tests: Prometheus and Alertmanager (real servers and their
# checkers for the monitoring tests), chromium and its driver (the web page in a browser),
# haproxy (the balancer in front of the fleet test's replicas).
tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 \
		&& command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
		&& command -v haproxy >/dev/null 2>&1 || { \
		echo "installing Debian's prometheus, prometheus-alertmanager, chromium, chromium-driver and haproxy (for the tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			prometheus prometheus-alertmanager chromium chromium-driver haproxy >/dev/null; \
	} || echo "warning: could not install the test tools; their tests skip here and fail under CI (CI=true)"

test: setup tools
	$(PY) -m pytest -q

# The slow real checks kept out of `make test`: FCN-8s (134 M parameters) exported with its
# parity gate, the FCNs' forward checks, the networks on the paper's 500x375 inputs, large
# images in tiles (over HTTP and in the browser), DDP launched by torchrun itself (make
# test starts the two workers with torchrun's environment), and a crowd of 20 MB uploads
# against a default server. About seven minutes on two AVX2 cores.
test-slow: setup tools
	$(PY) -m pytest -q -m slow -p no:cacheprovider

# Both images built (against a base made offline by debootstrap) and run by a private dockerd:
# needs root and a few minutes (the GPU image downloads the CUDA libraries as wheels, ~3 GB).
test-images: setup tools
	$(PY) -m pytest -m images tests/images -v -p no:cacheprovider
	@cat .bench/images-report.json

# The images' pins (docker/requirements-serve.txt) from pyproject.toml, resolved by pip
# without installing: after a dependency change, then `make test-images`.
lock: setup
	$(PY) docker/lock.py

# Three replicas behind haproxy with Prometheus, under load: rolling restarts, a SIGKILL, a
# new version rolled out, the autoscaling queries (tests/test_fleet.py). About five minutes.
test-fleet: setup tools
	$(PY) -m pytest -m fleet tests/test_fleet.py -v -p no:cacheprovider
	@cat .bench/fleet-report.json

# segserve batch on real Ray clusters on this machine: the driver SIGKILLed mid-job and the
# command run again, a worker node removed mid-job; each ends with every input exactly once.
# About two minutes.
test-batch: setup
	$(PY) -m pytest -m batch tests/test_batch_cluster.py -v -p no:cacheprovider

# segserve batch against bare session.run on 2,000 images, and its peak memory
# (docs/benchmarks.md, "segserve batch"). About 15 minutes on two cores.
bench-batch: setup
	$(PY) -m bench.batch_speed --images 2000 --out docs/bench

# The browser tests against the default model, saving what chromium showed into docs/images
# (the pictures the README shows).
screenshots: setup tools
	$(VENV)/bin/segserve init --repository $(REPOSITORY)
	SEGSERVE_SCREENSHOTS=docs/images SEGSERVE_BROWSER_REPOSITORY=$(REPOSITORY) \
		$(PY) -m pytest -q tests/test_browser.py -m "not images and not fleet" -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# segserve beside Triton and LitServe on the default model (docs/benchmarks.md); sets up each
# peer in its own venv under .bench/ from the package index. About 55 minutes.
bench-peers: setup
	$(VENV)/bin/segserve init --repository $(REPOSITORY)
	$(PY) -m bench.peers --repository $(REPOSITORY) --model unet-shapes --out docs/bench

# FCN-8s (untrained weights: speed only) served at 500x375 once per candidate runtime x
# arithmetic and with auto, beside the paper's 175 ms (docs/benchmarks.md). Exports and
# quantizes it once under .bench/paper; about 20 minutes on two AVX2 cores.
bench-paper: setup
	$(PY) -m bench.paper_speed --work .bench/paper --out docs/bench

# The shipped model served with SEGSERVE_VARIANT=auto against float32, alternating, mixed
# sizes at concurrency 8, and what each scores on fresh images (docs/benchmarks.md). About
# 8 minutes.
bench-auto: setup
	$(PY) -m bench.auto_speed --out docs/bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
