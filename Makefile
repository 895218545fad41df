# Everything runs from a virtualenv in .venv that the first target needing it creates.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-floor lint fmt bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/azproxy demo

test: $(STAMP)
	$(BIN)/pytest

# The oldest aiohttp setup.cfg accepts, in a virtualenv of its own: the declared range is a tested one.
AIOHTTP_FLOOR := $(shell sed -n 's/^ *aiohttp>=\([0-9.]*\),.*/\1/p' setup.cfg)
FLOOR_VENV    := .venv-floor
FLOOR_STAMP   := $(FLOOR_VENV)/.installed-$(AIOHTTP_FLOOR)

$(FLOOR_STAMP): setup.cfg pyproject.toml
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e '.[test]' 'aiohttp==$(AIOHTTP_FLOOR)'
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/pytest -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check azproxy tests bench
	$(BIN)/ruff format --check azproxy tests bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix azproxy tests bench
	$(BIN)/ruff format azproxy tests bench

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# As root on the server: azproxy in a virtualenv of its own, the systemd unit, and /etc/azproxy/azproxy.env
# from the example (mode 0600: systemd reads it as root; an existing one is kept). See the README's systemd section.
.PHONY: install-service
install-service:
	$(PYTHON) -m venv /opt/azproxy
	/opt/azproxy/bin/python -m pip install --quiet --upgrade pip
	/opt/azproxy/bin/python -m pip install --quiet '.[redis,entra]'
	install -d -m 0755 /etc/azproxy
	test -e /etc/azproxy/azproxy.env || install -m 0600 docker/azproxy.env.example /etc/azproxy/azproxy.env
	install -D -m 0644 docker/azproxy.service /etc/systemd/system/azproxy.service
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "Now edit /etc/azproxy/azproxy.env, test it: AZPROXY_ENV_FILE=/etc/azproxy/azproxy.env /opt/azproxy/bin/azproxy check"
	@echo "then start azproxy: systemctl enable --now azproxy"
