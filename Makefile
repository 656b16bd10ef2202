# Two entry points for a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAMCACHE := $(VENV)/bin/samcache
STAMPS := data/stamps
CACHE := cache/stamps
DEMO_PAGES ?= 60

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	@test -f $(STAMPS)/train.json || $(SAMCACHE) data stamps --out $(STAMPS) --n $(DEMO_PAGES) --seed 0
	$(SAMCACHE) data check $(STAMPS)
	$(SAMCACHE) embed $(STAMPS) --out $(CACHE) --model tiny
	$(SAMCACHE) info $(CACHE)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(STAMPS) $(CACHE) runs/
