# Developer entry points. CI runs `bash .ci/run`, which calls `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.example.toml

.PHONY: install test lint run certs clean bench

$(BIN)/relay: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/relay

# Four workers, one test file per worker at a time: files share no ports, folders or databases,
# and a file's tests keep their order (their fixtures are per file). Four even on two cores:
# much of a test's time is waiting (a relay process starting, a refusal's padding, a retry),
# and two workers left a third of the CPU idle.
# Then the tests marked `alone` (latency bounds, timing comparisons), one at a time, with the
# machine to themselves: what they measure is the relay, not the other test files' load.
test: install
	$(BIN)/python -m pytest -q -n 4 --dist loadfile -m "not alone"
	$(BIN)/python -m pytest -q -m alone

lint: install
	$(BIN)/ruff check relay keystore tests bench

certs: install
	$(BIN)/relay --config $(CONFIG) gen-cert

# The relay on the dev config: dev cert, keystore initialised, a local sink on 127.0.0.1:2525
# writing each delivered message to var/sink/, the admin console on 127.0.0.1:8025 with a
# fresh owner token (the previous `make run` token is revoked). Ctrl-C stops them all.
run: install
	@test -f certs/dev.crt || $(BIN)/relay --config $(CONFIG) gen-cert
	@$(BIN)/keystore --config $(CONFIG) init
	@$(BIN)/relay --config $(CONFIG) dev-sink --port 2525 --dir var/sink & sink=$$!; \
	  $(BIN)/keystore --config $(CONFIG) serve & console=$$!; \
	  trap "kill $$sink $$console 2>/dev/null" EXIT INT TERM; \
	  $(BIN)/relay --config $(CONFIG) hint; \
	  $(BIN)/keystore --config $(CONFIG) admin-token create --name "make run" --role owner --replace; \
	  $(BIN)/relay --config $(CONFIG) serve

bench: install
	$(BIN)/python bench/keystore_auth.py
	$(BIN)/python bench/auth_timing.py
	$(BIN)/python bench/spool.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/auth_storm.py
	$(BIN)/python bench/big_messages.py
	$(BIN)/python bench/submission.py

clean:
	rm -rf var .pytest_cache
