# xmig: the two commands of the README, and their parts.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
GUEST_BUILD ?= build/guest

.PHONY: install demo test lint unit clean guest-image

$(BIN)/xmig: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast,fuzz]'
	touch $@

install: $(BIN)/xmig

demo: install
	$(BIN)/xmig demo

lint: install
	$(BIN)/ruff check xmig tests bench
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q -p no:cacheprovider

test: lint unit

# the QEMU test guest (Debian kernel + busybox initramfs + workload), cached in $(GUEST_BUILD)
guest-image: install
	$(BIN)/python -m xmig.guest.qemu.image $(GUEST_BUILD)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
