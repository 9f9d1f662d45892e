#!/usr/bin/env bash
# Brings a Debian 12 machine to a working Bulkhead build and test setup. Idempotent: what is
# already there is left alone, so running it again costs a few seconds.
#
# Installs:
#  - the eBPF toolchain: Debian's rustc-web, cargo-web and libstd-rust-web-dev-bpf (Rust with a
#    prebuilt `core` for bpfel-unknown-none, and LLVM 22), or, where rustup nightly with rust-src
#    is present and those packages are not available, just LLVM 22 for bpf-linker;
#  - bpf-linker 0.13.0 built against LLVM 22;
#  - what the integration tests use: iproute2 (network namespaces), python3;
#  - bpffs at /sys/fs/bpf when nothing is mounted there (hosts without systemd).
# User space builds with the default rustup stable toolchain, which must already be installed.
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }
need_root() { [ "$(id -u)" = 0 ] || { echo "setup: run as root (apt-get, bpffs)" >&2; exit 1; }; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_install() {
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

nightly_has_rust_src() {
  command -v rustup >/dev/null && rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'
}

need_root
command -v cargo >/dev/null || { echo "setup: cargo (rustup stable) is required" >&2; exit 1; }

apt_install ca-certificates build-essential pkg-config iproute2 python3 zlib1g-dev libzstd-dev systemd asciinema \
  postgresql-15 postgresql-client-15 util-linux pgbouncer
# The HTTP gateway's tests and benchmark: nginx as the target (and as the reference reverse
# proxy), wrk as the load generator; curl, Python and Node as governed clients.
apt_install nginx-light wrk curl nodejs python3-requests

# kubectl for the Kubernetes tests (tests/tests/kube.rs): the one on the machine, else Debian's.
# Their exec goes over WebSocket, which kubectl has spoken since 1.29; Debian 12's
# kubernetes-client (1.20) speaks only SPDY, so with it the exec tests fail.
command -v kubectl >/dev/null || apt_install kubernetes-client
# The SSH gateway's tests: sshd on the target host, the ssh/scp/sftp clients governed.
apt_install openssh-server openssh-client
# Its pty resize test drives the client in tmux; its held-password test hashes with openssl.
apt_install tmux openssl
# Its X11 forwarding test needs sshd's xauth.
apt_install xauth
# The packaging tests: `vagrant validate` on vagrant/Vagrantfile (no provider needed).
apt_install vagrant

# Python driver for the PostgreSQL gateway tests.
if ! python3 -c "import psycopg" 2>/dev/null; then
  log "installing psycopg 3 from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "psycopg[binary]"
fi

if apt-cache show libstd-rust-web-dev-bpf >/dev/null 2>&1 || installed libstd-rust-web-dev-bpf; then
  apt_install rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev
elif nightly_has_rust_src; then
  log "Debian's bpf core is unavailable; using rustup nightly with rust-src"
  apt_install llvm-22-dev
else
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  if apt-cache show libstd-rust-web-dev-bpf >/dev/null 2>&1; then
    apt_install rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev
  else
    echo "setup: no eBPF toolchain: neither Debian's libstd-rust-web-dev-bpf nor rustup nightly with rust-src" >&2
    exit 1
  fi
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$CARGO_BIN/bpf-linker" --version 2>/dev/null | grep -q '0\.13\.0'; then
  log "building bpf-linker 0.13.0 against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --quiet --locked bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
fi

# The Debian package (cargo xtask deb; the packaging test installs and purges it).
if ! "$CARGO_BIN/cargo-deb" --version 2>/dev/null | grep -q 'cargo-deb 3\.8\.0'; then
  log "installing cargo-deb 3.8.0 (a few minutes)"
  cargo install --quiet --locked cargo-deb --version 3.8.0
fi

if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

log "ready"
