#!/usr/bin/env bash
# Set up a fresh machine for fedfleet: a virtualenv in .venv with the coordinator (and, with --dev, the test
# and lint tools plus Debian's mosquitto, which the tests start on free ports).
#
#   scripts/setup.sh          # to run the coordinator, agents and simulations
#   scripts/setup.sh --dev    # also to run the tests
set -euo pipefail
cd "$(dirname "$0")/.."

dev=false
[ "${1:-}" = "--dev" ] && dev=true

# Debian packages the tests use: mosquitto (a real broker), systemd (systemd-analyze verify on the unit),
# chromium (the dashboard's browser tests, driven by Playwright), prometheus (promtool checks and unit-tests
# the compose kit's alerting rules; its server is never started), nginx (a static TUF mirror the tests start on
# a free loopback port), and debootstrap with qemu-user-static (the Pi install run in an emulated arm64 root).
missing=()
if $dev; then
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  [ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
  command -v promtool >/dev/null || missing+=(prometheus)
  [ -x /usr/sbin/nginx ] || missing+=(nginx)
  [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static binfmt-support)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, as the CPU build where this machine's pip offers one: a bare requirement can pull CUDA (GBs).
echo "== installing torch 2.13.0 into .venv"
.venv/bin/python -m pip install -q "torch==2.13.0"
extras=server
$dev && extras=server,dev
echo "== installing fedfleet[$extras] into .venv"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "== ready: . .venv/bin/activate"
