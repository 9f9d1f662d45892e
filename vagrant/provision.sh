#!/usr/bin/env bash
# Runs inside the VM as root (vagrant's shell provisioner): toolchain, package, service, demo.
set -euo pipefail

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates git postgresql-15 >/dev/null

# The build needs a Rust toolchain (scripts/setup.sh installs the rest: LLVM, bpf-linker,
# cargo-deb, the packages the eBPF build needs).
if ! command -v cargo >/dev/null; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
export PATH="$HOME/.cargo/bin:$PATH"

cd /src/bulkhead
cargo xtask deb
DEBIAN_FRONTEND=noninteractive apt-get install -y ./target/debian/bulkhead_*.deb

# A governed user and a database for it, with the credential held by the gateway only.
id agent >/dev/null 2>&1 || useradd --create-home --shell /bin/bash agent
sudo -u postgres psql -qc "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='app') THEN CREATE ROLE app LOGIN PASSWORD 'demo-only'; END IF; END\$\$;"
sudo -u postgres createdb -O app demo 2>/dev/null || true
install -m 0600 /dev/stdin /etc/bulkhead/credentials/demo-db <<<'demo-only'
if ! grep -q 'name = "demo-db"' /etc/bulkhead/bulkhead.toml; then
  cat >> /etc/bulkhead/bulkhead.toml <<'TOML'

[[target]]
name = "demo-db"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
credentials = { file = "/etc/bulkhead/credentials/demo-db" }
TOML
fi
systemctl restart bulkhead.service
bulkhead doctor || true
echo
echo "Try: vagrant ssh -c 'sudo bulkhead run --user agent -- psql -h 127.0.0.1 -U app demo -c \"select 1\"'"
