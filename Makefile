# egress-agent: the two commands of the README, and what CI adds.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest browser test-programs attack-tools podman report-screenshot test-matrix bench bench-tools clean

$(STAMP): pyproject.toml
	tools/make-venv $(PYTHON) $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## The main job: a live check of this host (exit 1 means an unexpected external connection,
## which is a finding, not a failure of the command).
run: $(STAMP)
	@$(BIN)/egress-agent check --summary; rc=$$?; [ $$rc -le 1 ]

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check agent

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) browser test-programs attack-tools podman
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The real programs the tests run, from Debian's packages: curl and rpm for the identity tests;
## curl, wget, dig, ping, nc, dnsmasq, podman and runc for tests/test_truth_*.py. apt-gets those
## missing (as root; an ordinary user is told, and those tests skip with that reason).
test-programs:
	tools/install-test-programs

## iptables, systemd-analyze and util-linux's setpriv/unshare/prlimit for the local-attack tests
## (issue 23): apt-gets what is missing (as root; an ordinary user is told, and those tests skip).
attack-tools:
	tools/install-attack-tools

## Debian's chromium and chromium-driver, for the report's browser tests: apt-gets them when
## missing (as root; an ordinary user is told, and those tests skip with that reason).
browser:
	tools/install-browser

## Debian's podman and runc, for the container tests (a real runtime: tests/test_who_containers.py):
## apt-gets them when missing (as root; an ordinary user is told, and those tests skip).
podman:
	tools/install-podman

## docs/report.png: the report page of a test host's history, screenshot by the browser tests
## (root: the test host is made of network namespaces).
report-screenshot: $(STAMP) browser
	$(BIN)/python -m pytest tests/test_report_browser.py -q -k screenshot
	cp build/artifacts/report-top.png docs/report.png

## The suite on the oldest and newest supported interpreters (from pyenv, or on PATH).
MATRIX ?= 3.8 3.13
test-matrix:
	@set -e; for v in $(MATRIX); do \
	  py=$$(pyenv prefix $$v 2>/dev/null | head -n1)/bin/python$$v; \
	  [ -x "$$py" ] || py=$$(command -v python$$v); \
	  [ -n "$$py" ] || { echo "test-matrix: no python$$v (pyenv install $$v)"; exit 1; }; \
	  $(MAKE) --no-print-directory pytest PYTHON=$$py VENV=.venv-$$v; \
	done

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## The profilers bench/RESULTS.md used (pyinstrument, py-spy): make bench-tools, then e.g.
## .venv/bin/pyinstrument -m bench.worker cold bench.targets:our_sampler
bench-tools: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'

clean:
	rm -rf .venv .venv-* build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

## Packages: dist/egress-agent_<version>_<arch>.deb and dist/egress-agent-<version>-1.<rpmarch>.rpm
## for ARCH=amd64 (default) or arm64. package-test lints them (lintian, rpmlint) and, for this
## machine's architecture, installs, upgrades, removes and purges them in a Debian 12 chroot (root;
## packaging/install-tools apt-gets debootstrap, rpm, lintian and rpmlint when they are missing).
ARCH ?= amd64
.PHONY: package package-test
package:
	ARCH=$(ARCH) packaging/build

package-test: package
	packaging/install-tools
	packaging/lint $(ARCH)
	@case "$(ARCH):$$(uname -m)" in amd64:x86_64|arm64:aarch64) packaging/test-packages $(ARCH) ;; \
	  *) echo "package-test: ARCH=$(ARCH) packages are linted only (this machine is $$(uname -m))" ;; esac
