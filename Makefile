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

# The suite runs twice per Python: all of it on the default core (the C core, which the
# editable install builds: tests/test_speedups.py fails if it could be built and was not),
# then the files that record or read traces again on the pure-Python core, the reference
# (TRACEMARK_CORE=python), and those that read them through view, stats and export with the
# pure-Python reader; the rest of the suite never reaches the recording core. The pure core
# holds no version-specific code (its bytecode-specific neighbours, patching and probes, run
# in the main pass on every Python), so its pass runs on the oldest and newest Python of
# PYTHONS (3.11 and 3.13 in CI): that keeps CI under 20 minutes.
PURE_CORE_PYTHONS ?= $(firstword $(PYTHONS)) $(lastword $(PYTHONS))
PURE_CORE_TESTS = tests/test_speedups.py tests/test_recorder.py tests/test_ctf_reader.py \
  tests/test_ctf_interop.py tests/test_pools.py tests/test_any_values.py tests/test_losses.py \
  tests/test_recovery.py tests/test_sessions.py tests/test_tasks.py tests/test_reentrancy.py \
  tests/test_text_roundtrip.py tests/test_fork_locks.py tests/test_context_fields.py \
  tests/test_cli_view_stats.py tests/test_crafted_traces.py tests/test_export.py \
  tests/test_export_fast.py tests/test_index.py tests/test_fork_window.py tests/test_parquet.py

test: system-deps
	@status=0; for py in $(PYTHONS); do \
	  $(call venv_for,$$py); \
	  echo "=== Python $$v ($$py), $$($$venv/bin/python -m tracemark --version)"; \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider || status=1; \
	  case " $(PURE_CORE_PYTHONS) " in *" $$py "*) \
	    echo "=== Python $$v, pure-Python core: the tests that record or read traces"; \
	    TRACEMARK_CORE=python $$venv/bin/python -m pytest -q -p no:cacheprovider \
	      $(PURE_CORE_TESTS) || status=1;; \
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
