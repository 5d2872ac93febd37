# Tessera developer tasks. `just --list` shows them all.

# Backends for the production-shape test run (local PostgreSQL and Redis).
export TESSERA_TEST_DATABASE_URL := env_var_or_default("TESSERA_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
export TESSERA_TEST_REDIS_URL := env_var_or_default("TESSERA_TEST_REDIS_URL", "redis://127.0.0.1:6379")

default:
    @just --list

# Format the code.
fmt:
    cargo fmt --all

# Lints: rustfmt check and clippy with warnings denied.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --all-features -- -D warnings

# The whole test suite, on SQLite + in-process cache and on PostgreSQL + Redis.
test:
    TESSERA_REQUIRE_BACKENDS=1 cargo test --workspace

# Lint, proto lint and test: what CI checks.
verify: lint proto-lint test

# As `verify`, with the benchmark-sized cases at full size: the 2,000-way budget race,
# 1,000 ledger property cases per backend, the webhook sink down for a whole minute.
verify-full: lint proto-lint
    TESSERA_TEST_FULL=1 TESSERA_REQUIRE_BACKENDS=1 cargo test --workspace

# Every request of docs/api-tour.md against a fresh `tessera up`, answers checked.
api-tour:
    cargo build -p tessera
    python3 .ci/api-tour target/debug/tessera

# Schemathesis against /openapi.json of a running `tessera up` (the debug binary the
# tests build), as CI runs it.
api-fuzz:
    cargo build -p tessera
    bash .ci/api-fuzz target/debug/tessera

# Run the whole suite in one process on embedded defaults.
up:
    cargo run --release -p tessera -- up

# Lint the protobuf definitions with buf (installed locally from npm on first use).
proto-lint:
    test -x .tools/node_modules/.bin/buf || (mkdir -p .tools && cd .tools && npm install --no-audit --no-fund --silent @bufbuild/buf)
    cd proto && ../.tools/node_modules/.bin/buf lint

# Benchmarks (release build) on SQLite and PostgreSQL: wallet Credit, BatchCredit and Debit through gRPC; catalog 100k-code generation job; Qualify on the peer promotion dataset (../shared/bench/peer-promotions) beside the peer's figures, and the raw CEL cost. Redeem at 32 clients beside a bare SQL transaction of the same shape. Signed webhook deliveries to a local sink. A retention purge of 1,000,000 rows under load. TESSERA_BENCH=wallet|catalog|qualify|redeem|codes|queue|webhooks|retention runs one part, TESSERA_BENCH_ON=sqlite|postgres one backend.
bench:
    cargo run --release -p tessera-tests --bin bench
