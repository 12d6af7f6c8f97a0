# Two commands do all the set-up on a fresh machine:
#   make demo   venv + install + stack + real catalogue + real events + recommendations + stop
#   make test   venv + install + lint + types + unit, integration and fault tests on the real stack
#   make test-cluster   the same code on a local cluster (3 Kafka nodes, Redis Cluster, 2 Tritons)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data

.PHONY: demo test test-cluster lint unit integration system-deps install clean bench

$(BIN)/shoprec: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# setuptools warns about every editable install (a box of "!!"); nothing to act on.
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: system-deps $(BIN)/shoprec

# redis-server, Java 17 and Maven (for the Kafka jars); installed only when missing.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi

demo: install
	$(BIN)/shoprec demo --data $(DATA)/rees46-sample

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest tests/unit -q

integration: install
	$(BIN)/pytest tests/integration -q

# Everything but the cluster suite (unit, integration, faults: about 20 minutes on 2 cores).
test: lint
	$(BIN)/pytest -q -m "not cluster"

# The cluster suite: 3 Kafka nodes, Redis Cluster (3+3), 2 Tritons on loopback, and the
# faults that break them (about 4.3 GiB of memory; CI runs it after `make test`).
test-cluster: install
	$(BIN)/pytest -q -m cluster

# The latency sweep on Apache Kafka (1 and 2 workers) and on Tansu, then the
# feature-store benchmark and the pull API's; results (JSON + plots) land in bench/results/.
RATES ?= 100,500,1000,2000
bench: install
	$(BIN)/shoprec bench --rate $(RATES) --workers 1,2 --duration 10 --json bench/results/e2e-kafka.json
	$(BIN)/shoprec bench --broker tansu --rate $(RATES) --duration 10 --json bench/results/e2e-tansu.json
	$(BIN)/shoprec bench features --json bench/results/features.json
	$(BIN)/shoprec bench api --json bench/results/api.json

clean:
	-$(BIN)/shoprec stack down --wipe
	rm -rf .shoprec
