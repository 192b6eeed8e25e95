#!/usr/bin/env bash
# Install the MDMT systemd units, the `mdmt` system user and /etc/mdmt on a coordinator or a site.
#   deploy/scripts/install-units.sh [--venv /opt/mdmt/.venv] [--root DIR]
# --venv: the environment this project is installed in; --root: write under DIR instead of / (no user, no reload).
# Then, on the coordinator: systemctl enable --now mdmt-superlink; at site A: systemctl enable --now mdmt-supernode@A
set -euo pipefail
venv=/opt/mdmt/.venv
root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a path}; shift 2 ;;
    --root) root=${2:?--root needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install-units.sh: unknown option '$1' (use --venv PATH or --root DIR)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/mdmt" ]; then
  echo "install-units.sh: $venv/bin/mdmt not found; install this project into that environment first (deploy/README.md)" >&2
  exit 2
fi
unitdir="$root/etc/systemd/system"
install -d -m 0755 "$unitdir"
install -d -m 0750 "$root/etc/mdmt"
for unit in "$here"/systemd/*.service; do
  sed "s#/opt/mdmt/.venv#$venv#g; s#file:///opt/mdmt/deploy#file://$here#g" "$unit" > "$unitdir/$(basename "$unit")"
  chmod 0644 "$unitdir/$(basename "$unit")"
done
if [ "$root" = / ]; then
  id -u mdmt >/dev/null 2>&1 || useradd --system --home-dir /var/lib/mdmt --shell /usr/sbin/nologin mdmt
  chgrp mdmt /etc/mdmt
  systemctl daemon-reload
fi
echo "installed mdmt-superlink.service, mdmt-supernode@.service and mdmt-job@.service into $unitdir (environment $venv)"
