#!/usr/bin/env bash
# Sets up the Bulkhead demo, as root: the package (installed from a .deb if one is there, else
# built from the checkout), PostgreSQL with a demo database, a demo user `ai-agent` to govern,
# demo policies, and the daemon running. Vagrant's shell provisioner runs it inside the VM; the
# packaging test (tests/tests/packaging.rs) runs it on the CI machine, where systemd is not
# PID 1, with the variables below pointing at its own package and PostgreSQL cluster.
#
# Variables (defaults for the VM):
#   BULKHEAD_SRC      the checkout                                   [/src/bulkhead]
#   BULKHEAD_DEB      the package to install    [newest $BULKHEAD_SRC/vagrant/bulkhead_*.deb]
#   BULKHEAD_BUILD    auto: build only if there is no package; never: fail without one;
#                     always: build                                  [auto]
#   DEMO_PG_CLUSTER   the PostgreSQL 15 cluster (created if missing) [main]
#   DEMO_PG_PORT      its port                                       [5432]
#   DEMO_USER         the governed demo user (created if missing)    [ai-agent]
#   BULKHEAD_PIDFILE  without systemd: where the daemon's pid goes   [/run/bulkhead-demo.pid]
#   BULKHEAD_LOG      without systemd: the daemon's log              [/var/log/bulkhead-demo.log]
set -euo pipefail

src=${BULKHEAD_SRC:-/src/bulkhead}
build=${BULKHEAD_BUILD:-auto}
cluster=${DEMO_PG_CLUSTER:-main}
port=${DEMO_PG_PORT:-5432}
demo_user=${DEMO_USER:-ai-agent}
pidfile=${BULKHEAD_PIDFILE:-/run/bulkhead-demo.pid}
logfile=${BULKHEAD_LOG:-/var/log/bulkhead-demo.log}
unit=/lib/systemd/system/bulkhead.service

log() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
apt_install() {
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
systemd_runs() { [ -d /run/systemd/system ]; }
as_postgres() { runuser -u postgres -- "$@"; }
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" "$@"; }

[ "$(id -u)" = 0 ] || die "run as root"
case $port in '' | *[!0-9]*) die "DEMO_PG_PORT must be a port number, not '$port'" ;; esac

# 1. The package: the one given or found, else built from the checkout.
deb=${BULKHEAD_DEB:-}
if [ -z "$deb" ] && [ "$build" != always ]; then
  deb=$(ls -t "$src"/vagrant/bulkhead_*.deb 2>/dev/null | head -n1 || true)
fi
if [ -z "$deb" ]; then
  [ "$build" != never ] || die "no package (BULKHEAD_DEB, or $src/vagrant/bulkhead_*.deb) and BULKHEAD_BUILD=never"
  log "building the package from $src (10-20 minutes the first time)"
  apt_install curl ca-certificates git build-essential
  if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
  # cargo xtask deb runs scripts/setup.sh (eBPF toolchain, cargo-deb) and a release build.
  (cd "$src" && cargo xtask deb)
  deb=$(ls -t "$src"/target/debian/bulkhead_*.deb | head -n1)
fi
[ -f "$deb" ] || die "no package at $deb"
log "installing $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$(realpath "$deb")"

# 2. PostgreSQL 15 and the demo database: customers(name, email, ssn), owned by role `app`,
# whose password only the gateway holds.
apt_install postgresql-15 postgresql-client-15
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "15 $cluster"; then
  log "creating PostgreSQL cluster 15/$cluster on port $port"
  pg_createcluster 15 "$cluster" --port "$port" >/dev/null
fi
pg_lsclusters -h | awk -v c="$cluster" '$1 == 15 && $2 == c {print $3}' | grep -qx "$port" ||
  die "cluster 15/$cluster does not listen on port $port"
pg_ctlcluster 15 "$cluster" status >/dev/null 2>&1 || pg_ctlcluster 15 "$cluster" start
secret=/etc/bulkhead/credentials/demo-db
if [ ! -s "$secret" ]; then
  (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$secret")
fi
chmod 0600 "$secret"
password=$(head -n1 "$secret")
psql_admin -d postgres <<SQL
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app')
\gexec
ALTER ROLE app PASSWORD '$password';
SELECT 'CREATE DATABASE demo OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'demo')
\gexec
SQL
psql_admin -d demo <<'SQL'
SET ROLE app;
CREATE TABLE IF NOT EXISTS customers (id serial PRIMARY KEY, name text, email text, ssn text);
INSERT INTO customers (name, email, ssn)
SELECT * FROM (VALUES ('Alice', 'alice@example.com', '123-45-6789'),
                      ('Bob', 'bob@example.com', '987-65-4321'),
                      ('Carol', 'carol@example.com', '555-12-3456')) AS v
WHERE NOT EXISTS (SELECT FROM customers);
SQL

# 3. The target, and the demo policies (the packaged observe-first file keeps every other
# destination in observe mode; the demo target's own table enforces).
if ! grep -q '^name = "demo-db"' /etc/bulkhead/bulkhead.toml; then
  cat >>/etc/bulkhead/bulkhead.toml <<TOML

# The demo database (vagrant/provision.sh).
[[target]]
name = "demo-db"
protocol = "postgres"
addresses = ["127.0.0.1:$port"]
credentials = { file = "$secret" }
postgres = { user = "app" }
TOML
fi
cat >/etc/bulkhead/policies/demo-db.toml <<'TOML'
# The demo (vagrant/provision.sh): reads and inserts/updates pass, DROP and other DDL are
# refused with a message, a DELETE waits for an admin, and the ssn column is masked.
[[target]]
name = "demo-db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"
mode = "enforce"

[[rule]]
id = "demo-reads-and-writes"
verdict = "allow"
target = { name = ["demo-db"] }
sql = { class = ["read", "transaction", "session", "insert", "update"] }

[[rule]]
id = "demo-no-ddl"
verdict = "deny"
message = "schema changes are not made through the gateway: ship them as a migration"
target = { name = ["demo-db"] }
sql = { class = ["ddl", "truncate", "grant", "role"] }

[[rule]]
id = "demo-deletes-approved"
description = "A human looks at every DELETE before it runs"
verdict = "approve"
target = { name = ["demo-db"] }
sql = { class = ["delete"] }

[[rule]]
id = "demo-mask-ssn"
verdict = "mask"
target = { name = ["demo-db"] }
mask = { columns = ["public.customers.ssn"], style = "keep-last-4" }
TOML
bulkhead policy check >/dev/null

# 4. The governed demo user (never in the bulkhead admin group).
if ! id "$demo_user" >/dev/null 2>&1; then
  log "creating user $demo_user"
  useradd --create-home --shell /bin/bash "$demo_user"
fi

# 5. The daemon: the service under systemd; elsewhere (containers, CI) the unit's own command
# line and environment, read from the installed unit, in the background with a pid file.
daemon_ready() { bulkhead status >/dev/null 2>&1; }
if systemd_runs; then
  systemctl restart bulkhead.service
else
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "a daemon started by this script runs (pid $(cat "$pidfile")); stop it first"
  fi
  exec_start=$(sed -n 's/^ExecStart=[-@:+!]*//p' "$unit")
  [ -n "$exec_start" ] || die "no ExecStart in $unit"
  mapfile -t command < <(xargs -n1 <<<"$exec_start")
  environment=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  while IFS= read -r line; do
    mapfile -t -O "${#environment[@]}" environment < <(xargs -n1 <<<"$line")
  done < <(sed -n 's/^Environment=//p' "$unit")
  # What systemd creates and exports for StateDirectory=, RuntimeDirectory= and
  # ConfigurationDirectory= (the modes are the unit's).
  mode() { sed -n "s/^$1=//p" "$unit"; }
  install -d -m "$(mode StateDirectoryMode)" /var/lib/bulkhead
  install -d -m "$(mode RuntimeDirectoryMode)" /run/bulkhead
  environment+=(STATE_DIRECTORY=/var/lib/bulkhead RUNTIME_DIRECTORY=/run/bulkhead CONFIGURATION_DIRECTORY=/etc/bulkhead)
  log "systemd is not running: starting ${command[*]} as bulkhead.service would (log: $logfile)"
  (cd / && exec env -i "${environment[@]}" setsid "${command[@]}" </dev/null >>"$logfile" 2>&1) &
  echo $! >"$pidfile"
fi
for _ in $(seq 300); do
  daemon_ready && break
  if ! systemd_runs && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    tail -n 20 "$logfile" >&2
    die "the daemon exited"
  fi
  sleep 0.1
done
daemon_ready || die "the daemon did not answer within 30 s"

bulkhead doctor || true
cat <<EOF

The demo is ready. As root (vagrant ssh, then sudo -i), follow "Try it in a VM" in README.md:
  bulkhead run --user $demo_user -- psql -X -h 127.0.0.1 -p $port -U app demo -c 'DROP TABLE customers'
EOF
