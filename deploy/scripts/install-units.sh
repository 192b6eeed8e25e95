#!/usr/bin/env bash
# Install the MDMT systemd units, the `mdmt` system user and /etc/mdmt on a coordinator or a site.
#   deploy/scripts/install-units.sh [--venv /opt/mdmt/.venv] [--root DIR] [--site SITE]...
# --venv: the environment this project is installed in; --root: write under DIR instead of / (no user, no reload);
# --site: also write SITE's network drop-in from /etc/mdmt/site-SITE.toml (mdmt deploy site-network; repeatable).
# Then, on the coordinator: systemctl enable --now mdmt-superlink; at site A: systemctl enable --now mdmt-supernode@A
set -euo pipefail
venv=/opt/mdmt/.venv
root=/
sites=()
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a path}; shift 2 ;;
    --root) root=${2:?--root needs a folder}; shift 2 ;;
    --site) sites+=("${2:?--site needs a site name}"); shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install-units.sh: unknown option '$1' (use --venv PATH, --root DIR or --site SITE)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/mdmt" ]; then
  echo "install-units.sh: $venv/bin/mdmt not found; install this project into that environment first (deploy/README.md)" >&2
  exit 2
fi
for site in ${sites[@]+"${sites[@]}"}; do
  if ! [[ $site =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
    echo "install-units.sh: --site '$site': a site name is 1-64 letters, digits, '_' or '-'" >&2
    exit 2
  fi
  if [ ! -f "$root/etc/mdmt/site-$site.toml" ]; then
    echo "install-units.sh: --site $site: $root/etc/mdmt/site-$site.toml not found; write it with 'mdmt deploy site-config' first" >&2
    exit 2
  fi
done
unitdir="$root/etc/systemd/system"
install -d -m 0755 "$unitdir"
install -d -m 0750 "$root/etc/mdmt"
for unit in "$here"/systemd/*.service; do
  sed "s#/opt/mdmt/.venv#$venv#g; s#file:///opt/mdmt/deploy#file://$here#g" "$unit" > "$unitdir/$(basename "$unit")"
  chmod 0644 "$unitdir/$(basename "$unit")"
done
echo "installed mdmt-superlink.service, mdmt-supernode@.service and mdmt-job@.service into $unitdir (environment $venv)"
for site in ${sites[@]+"${sites[@]}"}; do
  written=$("$venv/bin/mdmt" deploy site-network "$root/etc/mdmt/site-$site.toml" --unit-dir "$unitdir")
  echo "${written%%$'\n'*}"
done
if [ "$root" = / ]; then
  id -u mdmt >/dev/null 2>&1 || useradd --system --home-dir /var/lib/mdmt --shell /usr/sbin/nologin mdmt
  chgrp mdmt /etc/mdmt
  systemctl daemon-reload
fi
