#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs every test:
# formatting, lints, Rust unit/integration/property tests, the web app's
# property tests, and the browser end-to-end tests in a private network
# namespace.
#
# Needs root (apt-get, ip netns) on a Debian machine with Rust installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v turnutils_uclient >/dev/null || need_apt+=(coturn)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ss >/dev/null || need_apt+=(iproute2)
command -v ethtool >/dev/null || need_apt+=(ethtool)
command -v openssl >/dev/null || need_apt+=(openssl)
[ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v fail2ban-regex >/dev/null || need_apt+=(fail2ban)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  apt-get update -qq
  # The tests start nginx and coturn themselves, and run fail2ban's tools:
  # keep the packages from starting their system services (nginx on port
  # 80, fail2ban's firewall rules) while installing.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  echo "==> npm install (tests/e2e)"
  (cd tests/e2e && npm install --no-audit --no-fund --loglevel=error)
fi
if [ ! -d tests/app/node_modules/fast-check ]; then
  echo "==> npm install (tests/app)"
  (cd tests/app && npm install --no-audit --no-fund --loglevel=error)
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
# The kernel relay's tests (XDP, network namespaces) skip themselves
# without root; here they must run.
# Six tests at a time rather than one per core: the TURN interop tests
# spend most of their time waiting on coturn's clients, which pace their
# packets (3.5 min at two at a time, 1.5 min at six). Every test keeps to
# its own ports and network namespaces, so they can overlap.
RUST_TEST_THREADS=6 CALLISTO_REQUIRE_ROOT_TESTS=1 cargo test --workspace --locked
echo "==> web app property tests (no browser)"
(cd tests/app && node --test --test-reporter=spec)
echo "==> browser end-to-end tests"
# They run target/debug/callisto, which cargo test built for the
# integration tests above.
bash tests/e2e/run.sh
