# Two entry points for a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAMCACHE := $(VENV)/bin/samcache
STAMPS := data/stamps
CACHE := cache/stamps
RUN := runs/stamps
REPORT := reports/stamps
# The tiny model starts from samcache's weights pretrained on synthetic shapes (never stamps). Its
# decoder is fine-tuned on stamps with SAM's loss at lr 1e-3 (README, "Which loss"); the end-to-end
# test (tests/test_pretrained_tiny.py) trains with these same flags.
DEMO_TRAIN := --epochs 8 --lr 1e-3 --loss sam --batch-size 4 --objects-per-image 4
DEMO_PAGES ?= 60

.PHONY: install browser demo test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,serve,hq]'
	# MobileSAM's own code (mobile_sam), as published on PyPI inside mobilesam-lite, reads vit_t exports
	# back in export's check and the tests. Without its dependencies: it declares opencv-python, which
	# would replace opencv-python-headless's cv2, and a vendored ultralytics that samcache never imports.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt 'mobilesam-lite==0.1.2'
	# sam2 ships as source: built against the torch above (no isolated build, which would download
	# another torch) and without its optional CUDA extension.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation -c constraints.txt 'sam2==1.1.0'
	touch $@

# The system Chromium and its chromedriver, for the browser tests (tests/browser.py): installed from
# Debian's packages here, never downloaded by selenium at test time.
browser:
	bash scripts/install-browser.sh

demo: install
	@test -f $(STAMPS)/train.json || $(SAMCACHE) data stamps --out $(STAMPS) --n $(DEMO_PAGES) --seed 0
	$(SAMCACHE) data check $(STAMPS)
	$(SAMCACHE) embed $(STAMPS) --out $(CACHE) --model tiny
	$(SAMCACHE) info $(CACHE)
	@test -f $(RUN)/last.pt || $(SAMCACHE) train $(CACHE) --out $(RUN) $(DEMO_TRAIN)
	$(SAMCACHE) export --run $(RUN) --out $(RUN)/sam_tiny_stamps.pth --overwrite
	$(SAMCACHE) eval $(CACHE) --run $(RUN) --out $(REPORT) --split test --overwrite

# The fast suite: every unit and pipeline test (the pipeline's on samcache's micro model), in a few
# minutes, without a browser; `test-all` adds the slow acceptance cases (pytest marker `slow`) and
# the tests in headless Chromium (marker `browser`). CI runs both.
# The fast suite runs in one pytest process per core (pytest-xdist, each test file in one process)
# with one torch thread each: as many threads as cores, never more, and the cores stay busy through
# the Python, file and process work between the products (one process with 2 threads kept ~1.3 of
# 2 cores busy). TEST_PROCESSES=1 runs it in this process, with torch's default threads.
TEST_PROCESSES ?= auto
test: install
	$(VENV)/bin/ruff check samcache
ifeq ($(TEST_PROCESSES),1)
	$(PY) -m pytest -q -m "not slow and not browser"
else
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not browser" -n $(TEST_PROCESSES) --dist loadfile
endif

test-all: install browser
	$(VENV)/bin/ruff check samcache
	$(PY) -m pytest -q

clean:
	rm -rf $(STAMPS) $(CACHE) $(RUN) $(REPORT)
