# Two jobs, each doing its own set-up (a virtual environment per Python under .venv-X.Y):
#   make demo   record the bundled demo program with `tracemark record`, then show the trace
#   make test   lint, then the test suite on every supported Python found
# PYTHONS lists the interpreters `make test` uses; CI sets it to 3.11, 3.12 and 3.13.

PYTHON  ?= python3
PYTHONS ?= $(PYTHON) $(lastword $(wildcard /root/.pyenv/versions/3.12.*/bin/python3.12)) \
           $(lastword $(wildcard /root/.pyenv/versions/3.13.*/bin/python3.13))
EXTRAS  ?= test,bench

.PHONY: demo test lint bench system-deps

# venv-for PY: print the venv directory for interpreter PY, creating and filling it if needed.
define venv_for
v=$$($(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
venv=.venv-$$v; \
if [ ! -x $$venv/bin/python ]; then $(1) -m venv $$venv >&2 || exit 1; fi; \
$$venv/bin/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]' \
  >$$venv/pip.log 2>&1 || { cat $$venv/pip.log >&2; exit 1; }
endef

# The demo: record the bundled shop (4 worker threads and an invoice-printer child process,
# about 5,700 events), then show what the trace holds, its first events and its slowest order.
DEMO_TRACE ?= tracemark-traces/demo

demo:
	@$(call venv_for,$(PYTHON)); \
	rm -rf $(DEMO_TRACE); \
	echo "\$$ tracemark record -o $(DEMO_TRACE) -- python -m tracemark.demo --orders 600"; \
	$$venv/bin/tracemark record -o $(DEMO_TRACE) -- $$venv/bin/python -m tracemark.demo --orders 600 \
	  || exit $$?; \
	echo; echo "\$$ tracemark stats $(DEMO_TRACE)"; \
	$$venv/bin/tracemark stats $(DEMO_TRACE) || exit $$?; \
	echo; echo "\$$ tracemark view $(DEMO_TRACE) --limit 12"; \
	$$venv/bin/tracemark view $(DEMO_TRACE) --limit 12 || exit $$?; \
	echo; echo "\$$ tracemark spans $(DEMO_TRACE) --top 1"; \
	$$venv/bin/tracemark spans $(DEMO_TRACE) --top 1 || exit $$?; \
	echo; echo "\$$ tracemark view $(DEMO_TRACE) --filter 'name == \"shop.payment\" and ok == \"no\"' --limit 5"; \
	$$venv/bin/tracemark view $(DEMO_TRACE) --filter 'name == "shop.payment" and ok == "no"' --limit 5

# The whole suite runs on every Python on the default core (the C core, which the editable
# install builds: tests/test_speedups.py fails if it could be built and was not), then again
# on the pure-Python core, the reference (TRACEMARK_CORE=python). Each pass is shared
# between PYTEST_JOBS processes by pytest-xdist (2: CI's machine has 2 CPUs), then the tests
# marked serial (they measure their whole process's memory, or bound losses) run alone.
# PURE_CORE_PYTHONS: the Pythons of PYTHONS whose pure-core pass runs: the oldest and the
# newest (3.11 and 3.13 in CI). The pure core holds no version-specific code of its own; its
# probes' sys.monitoring callbacks are 3.12's and 3.13's alike; and a sixth pass would take
# CI past 20 minutes.
PYTEST_JOBS       ?= 2
PURE_CORE_PYTHONS ?= $(firstword $(PYTHONS)) $(lastword $(PYTHONS))

test: system-deps
	@status=0; \
	suite() { r=0; "$$@" -m pytest -q -p no:cacheprovider -n $(PYTEST_JOBS) -m 'not serial' || r=1; \
	  "$$@" -m pytest -q -p no:cacheprovider -m serial || r=1; return $$r; }; \
	for py in $(PYTHONS); do \
	  $(call venv_for,$$py); \
	  echo "=== Python $$v ($$py), $$($$venv/bin/python -m tracemark --version)"; \
	  suite $$venv/bin/python || status=1; \
	  case " $(PURE_CORE_PYTHONS) " in *" $$py "*) \
	    echo "=== Python $$v, pure-Python core (TRACEMARK_CORE=python)"; \
	    suite env TRACEMARK_CORE=python $$venv/bin/python || status=1;; \
	  esac; \
	done; \
	$(MAKE) --no-print-directory lint || status=1; \
	exit $$status

lint:
	@$(call venv_for,$(PYTHON)); \
	$$venv/bin/ruff check . && $$venv/bin/ruff format --check .

bench:
	@$(call venv_for,$(PYTHON)); \
	$$venv/bin/python -m benchmarks.run --write

# Tools the tests use that are not Python packages: babeltrace2 reads our CTF traces; the
# viewer checks (tests/test_viewers.py) open exports in speedscope in Debian's Chromium,
# driven by Playwright (1.61: the last that runs on Debian 12's node 18); those two npm
# packages, pinned, go into .viewers/ (ignored by git).
# Each step runs only when its tool is missing. Without root or apt-get, babeltrace2 is an
# error (its tests cannot be skipped) and the viewer tests skip, saying what is missing.
SYSTEM_PACKAGES = babeltrace2:babeltrace2 chromium:chromium node:nodejs npm:npm
VIEWER_NPM      = speedscope@1.25.0 playwright-core@1.61.1

system-deps:
	@missing=; for p in $(SYSTEM_PACKAGES); do \
	  command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	      >/dev/null) >&2 || exit 1; \
	  elif ! command -v babeltrace2 >/dev/null 2>&1; then \
	    echo "babeltrace2 is needed by the tests: apt-get install babeltrace2" >&2; exit 1; \
	  else echo "viewer tests will skip: apt-get install$$missing" >&2; fi; \
	fi; \
	if command -v npm >/dev/null 2>&1; then \
	  for pkg in $(VIEWER_NPM); do \
	    v=$$(node -p "require('./.viewers/node_modules/$${pkg%@*}/package.json').version" 2>/dev/null); \
	    [ "$$v" = "$${pkg##*@}" ] || { npm install --prefix .viewers --no-audit --no-fund \
	      --no-save --loglevel=error $(VIEWER_NPM) >/dev/null || exit 1; break; }; \
	  done; \
	fi
