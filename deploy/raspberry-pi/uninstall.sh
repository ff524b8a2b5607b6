#!/usr/bin/env bash
# Remove the fedfleet agent installed by install.sh.
#
#   sudo ./uninstall.sh [--prefix DIR] [--purge]
#
# Keeps the state directory (installed models, unsent telemetry) unless --purge; --purge also removes the
# fedfleet system user.
set -euo pipefail
prefix="" purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
root="${prefix%/}"
if [ -z "$prefix" ] && command -v systemctl >/dev/null; then
  systemctl disable --now fedfleet-agent.service 2>/dev/null || true
fi
rm -f "$root/etc/systemd/system/fedfleet-agent.service"
[ -z "$prefix" ] && command -v systemctl >/dev/null && systemctl daemon-reload || true
rm -rf "$root/opt/fedfleet-agent" "$root/etc/fedfleet-agent"
if [ "$purge" = 1 ]; then
  rm -rf "$root/var/lib/fedfleet-agent"
  [ -z "$prefix" ] && id fedfleet >/dev/null 2>&1 && userdel fedfleet || true
  echo "removed the agent, its state and its user"
else
  echo "removed the agent; state kept in $root/var/lib/fedfleet-agent (--purge removes it)"
fi
