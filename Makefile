# nbdswap — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STATE_DIR ?= var
LISTEN ?= tcp://127.0.0.1:10809
SIZE ?= 4G
RAM_MAX ?= 1G
DISK_MAX ?= 8G
# Kernel and initramfs of the VM end-to-end test.
VM_DIR := build/vm

# Debian packages: real NBD clients and servers for the tests, QEMU and a
# busybox for the VM end-to-end tests, whose static memory hog the C toolchain
# builds (binutils' strip for their images, e2fsprogs for the local guest's disk),
# Redis for the remote tier, Prometheus (promtool) for the metrics, openssl for
# TLS certificates, systemd for systemd-analyze, valgrind for
# bench/write_instructions.py (callgrind).
# `make run` needs only RUN_PACKAGES: Debian 12's python3 lacks venv without
# python3-venv, and the slab allocator is C (nbdswap/tiers/_slab.c), which pip
# builds with the C toolchain and Python's headers.
RUN_PACKAGES := python3-venv python3-dev gcc libc6-dev
APT_PACKAGES := $(RUN_PACKAGES) libnbd-bin python3-libnbd qemu-utils nbdkit nbd-client fio \
	qemu-system-x86 busybox-static cpio kmod iproute2 binutils e2fsprogs \
	redis-server redis-tools prometheus python3-yaml openssl systemd \
	ca-certificates procps valgrind

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench deps run-deps venv test-venv vm-image clean clean-state

run: run-deps venv
	mkdir -p $(STATE_DIR)
	$(VENV)/bin/nbdswap serve --listen $(LISTEN) --export swap --size $(SIZE) \
		--state-dir $(STATE_DIR) --ram-max $(RAM_MAX) --disk-max $(DISK_MAX)

test: deps test-venv vm-image
	NBDSWAP_VM_DIR=$(VM_DIR) $(VPY) -m pytest -ra

# Benchmarks against nbdkit in the same run (bench/RESULTS.md); BENCH_ARGS=--quick
# for short jobs, --vm to add the VM swap wall time.
bench: deps venv
	$(VPY) bench/fio_compare.py $(BENCH_ARGS)

# The server's own dependencies; test-venv adds pytest, hypothesis and atheris.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py nbdswap/tiers/_slab.c
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -e .
	touch $@

test-venv: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

# Installs the Debian packages of $(1) that are missing.
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES))

run-deps:
	$(call apt_install,$(RUN_PACKAGES))

# The venv too: the local guest runs nbdswap serve with the venv's dependencies.
vm-image: deps venv
	deploy/vm/build.sh $(VM_DIR)

clean:
	rm -rf $(VENV) build *.egg-info

# Removes the device's data: the block map and disk tier in $(STATE_DIR) and the RAM
# tier's arena in /dev/shm (kept across restarts by design, so that RAM blocks survive
# one).  Refused while a server uses the state dir.
clean-state: venv
	$(VENV)/bin/nbdswap wipe --state-dir $(STATE_DIR)
