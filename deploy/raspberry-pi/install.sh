#!/usr/bin/env bash
# Install the fedfleet agent on Raspberry Pi OS (Debian 12, Python 3.11, arm64) from an enrollment bundle.
#
#   sudo ./install.sh --bundle DIR                 # the bundle from `fedfleet devices enroll NAME --out DIR`
#
# Options:
#   --bundle DIR     enrollment bundle: agent.toml, root.json, director_keys.json and the device's TLS
#                    identity ca.pem, device.pem, device-key.pem (required)
#   --package SPEC   what pip installs (default: fedfleet, the agent without server extras; or a path/wheel)
#   --prefix DIR     install below DIR instead of / (for packaging and tests; no user, no systemctl)
#   --no-start       write the unit but do not enable or start it
#
# Result: a virtualenv in /opt/fedfleet-agent/venv (and the agent's -OO bytecode in /opt/fedfleet-agent/pycache),
# the bundle in /etc/fedfleet-agent (0640, group fedfleet; the device key 0600 for the agent's user alone), state
# in /var/lib/fedfleet-agent owned by the system user fedfleet, and the systemd unit fedfleet-agent.service
# (restart, watchdog, sandboxing). uninstall.sh undoes it.
set -euo pipefail

bundle="" package="fedfleet" prefix="" start=1
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a directory}"; shift 2 ;;
    --package) package="${2:?--package needs a pip requirement}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$bundle" ] || { echo "install.sh: --bundle DIR is required (from fedfleet devices enroll)" >&2; exit 2; }
for f in agent.toml root.json director_keys.json; do
  [ -f "$bundle/$f" ] || { echo "install.sh: $bundle/$f is missing; is this an enrollment bundle?" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "install.sh: python3 is required (apt-get install python3-venv)" >&2; exit 1; }

root="${prefix%/}"
venv="$root/opt/fedfleet-agent/venv"
pycache="$root/opt/fedfleet-agent/pycache"
conf="$root/etc/fedfleet-agent"
state="$root/var/lib/fedfleet-agent"
unitdir="$root/etc/systemd/system"
user=fedfleet
here="$(cd "$(dirname "$0")" && pwd)"

if [ -z "$prefix" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or give --prefix DIR" >&2; exit 1
fi

echo "== system user $user"
if [ -z "$prefix" ]; then
  id "$user" >/dev/null 2>&1 || useradd --system --home-dir /var/lib/fedfleet-agent --shell /usr/sbin/nologin "$user"
else
  echo "   (skipped under --prefix)"
fi

echo "== virtualenv $venv ($package)"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$package"

echo "== slimming the virtualenv"
# What the running agent never loads: pip and setuptools (running install.sh again brings pip back for an
# upgrade), numpy's test suites, and LiteRT's WebGPU accelerator, NPU compiler plugins and command-line tools
# (the agent runs models on the CPU through the Interpreter API). About 70 MB of 200.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$venv/bin/python" -m pip uninstall -q -y pip setuptools || true
# Whatever pip's own uninstall leaves behind (files missing from its RECORD) goes too.
rm -rf "$site"/pip "$site"/pip-*.dist-info "$site"/setuptools "$site"/setuptools-*.dist-info \
  "$site"/pkg_resources "$site"/_distutils_hack "$site"/distutils-precedence.pth
if [ -d "$site/numpy" ]; then find "$site/numpy" -depth -type d -name tests -exec rm -rf {} +; fi
rm -rf "$site/ai_edge_litert/libLiteRtWebGpuAccelerator.so" "$site/ai_edge_litert/vendors" "$site/ai_edge_litert/tools"
# The unit runs the agent with -OO and its bytecode in $pycache (see fedfleet-agent.service.in): compiled here,
# by importing what the agent imports, so that it neither compiles at each start nor can write code it runs later.
rm -rf "$pycache"
env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$pycache" "$venv/bin/python" -OO -m edge_agent.bytecode

echo "== configuration $conf"
install -d -m 0750 "$conf" "$state"
install -m 0640 "$bundle/root.json" "$bundle/director_keys.json" "$conf/"
for f in ca.pem device.pem; do  # bundles made before TLS existed have none
  if [ -f "$bundle/$f" ]; then install -m 0640 "$bundle/$f" "$conf/"; fi
done
# The device's private key is the agent's alone: not readable by the group applications use for agent.sock.
if [ -f "$bundle/device-key.pem" ]; then install -m 0600 "$bundle/device-key.pem" "$conf/"; fi
# The bundle's state_dir is relative; on the device it is the service's state directory.
sed -E "s|^state_dir = .*|state_dir = \"$state\"|" "$bundle/agent.toml" > "$conf/agent.toml"
chmod 0640 "$conf/agent.toml"
"$venv/bin/fedfleet-agent" status --config "$conf/agent.toml" >/dev/null  # the config parses and loads

echo "== systemd unit $unitdir/fedfleet-agent.service"
install -d "$unitdir"
sed -e "s|@USER@|$user|g" -e "s|@VENV@|$venv|g" -e "s|@CONF@|$conf|g" -e "s|@STATE@|$state|g" \
  -e "s|@PYCACHE@|$pycache|g" "$here/fedfleet-agent.service.in" > "$unitdir/fedfleet-agent.service"

if [ -z "$prefix" ]; then
  chown -R root:"$user" "$conf"
  if [ -f "$conf/device-key.pem" ]; then chown "$user":root "$conf/device-key.pem"; fi
  chown -R "$user":"$user" "$state"
  if [ "$start" = 1 ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable --now fedfleet-agent.service
    echo "== started: systemctl status fedfleet-agent; journalctl -u fedfleet-agent -f"
  fi
fi
echo "== installed: $("$venv/bin/fedfleet-agent" --version)"
