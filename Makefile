# Two commands for a newcomer:  `make demo` (train a model end to end) and `make test`.
# Both create .venv on first use and install everything reflow needs into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.reflow-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# reflow depends on a torch range (bring your own CUDA build); when torch is missing,
	@# install the pinned 2.13.0 first so the range is met without pulling a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/reflow demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf runs data/addition
