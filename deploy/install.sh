#!/usr/bin/env bash
# Install or upgrade glowtriage as a systemd service. Safe to run again: it creates what is missing,
# upgrades the code, and never overwrites an existing /etc/glowtriage/config.toml.
#
#   sudo deploy/install.sh [--dry-run] [--gpu] [--port104] [--no-start]
#                          [--source DIR|WHEEL] [--python PYTHON] [--pip-args "ARGS"]
#
#   --dry-run     print what would be done, change nothing (no root needed)
#   --gpu         add the drop-in that opens /dev/nvidia* to the sandbox
#   --port104     add the drop-in that allows binding port 104 (set [dicom] port = 104 yourself)
#   --no-start    install and enable, but do not (re)start the service
#   --source      what pip installs (default: this checkout)
#   --python      interpreter for the virtualenv, >= 3.11 (default: python3)
#   --pip-args    extra pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
#
# Layout: code in /opt/glowtriage/.venv, config in /etc/glowtriage/config.toml (root:glowtriage 0640),
# data in /var/lib/glowtriage (systemd StateDirectory, glowtriage 0700), unit in /etc/systemd/system.
set -euo pipefail

USER_NAME=glowtriage
PREFIX=/opt/glowtriage
ETC=/etc/glowtriage
STATE=/var/lib/glowtriage
UNIT_DIR=/etc/systemd/system
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(dirname "$HERE")"
PYTHON=python3
PIP_ARGS=""
DRY_RUN=0
GPU=0
PORT104=0
START=1

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --gpu) GPU=1 ;;
    --port104) PORT104=1 ;;
    --no-start) START=0 ;;
    --source) SOURCE="${2:?--source needs a value}"; shift ;;
    --python) PYTHON="${2:?--python needs a value}"; shift ;;
    --pip-args) PIP_ARGS="${2:?--pip-args needs a value}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '==> %s\n' "$*"; }

# Run a command, or only show it with --dry-run.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Write stdin to a file (mode, owner:group) unless it already has exactly that content.
put() {
  local path="$1" mode="$2" owner="$3" tmp
  tmp="$(mktemp)"
  cat >"$tmp"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"; say "unchanged $path"; return 0
  fi
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+ write %s (%s %s, %s bytes)\n' "$path" "$mode" "$owner" "$(wc -c <"$tmp")"
    rm -f "$tmp"
  else
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$path"
    rm -f "$tmp"; say "wrote $path"
  fi
}

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
  echo "install.sh: run as root (or with --dry-run to see what it would do)" >&2
  exit 1
fi
if [[ ! -e "$SOURCE" ]]; then
  echo "install.sh: --source $SOURCE does not exist" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: $PYTHON is missing or older than Python 3.11 (use --python)" >&2
  exit 1
fi

say "service user $USER_NAME"
if getent passwd "$USER_NAME" >/dev/null; then
  say "user $USER_NAME exists"
else
  run useradd --system --user-group --home-dir "$STATE" --no-create-home \
    --shell /usr/sbin/nologin --comment "glowtriage daemon" "$USER_NAME"
fi

say "virtualenv $PREFIX/.venv"
run install -d -m 0755 -o root -g root "$PREFIX"
if [[ -x "$PREFIX/.venv/bin/python" ]]; then
  say "virtualenv exists"
else
  run "$PYTHON" -m venv "$PREFIX/.venv"
fi
run "$PREFIX/.venv/bin/pip" install --quiet --upgrade pip
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
run "$PREFIX/.venv/bin/pip" install --quiet --upgrade $PIP_ARGS "$SOURCE"
# The deploy notes travel with the code (the unit's Documentation= points here).
run install -d -m 0755 "$PREFIX/deploy"
run cp -r "$HERE/." "$PREFIX/deploy/"

say "configuration $ETC"
run install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
# The shipped config (beside this script's folder) with the storage root moved to the unit's
# StateDirectory; kept as .dist so upgrades show new keys without touching the live file.
SHIPPED_CONFIG="$(dirname "$HERE")/config.toml"
if ! grep -q '^root = "var"$' "$SHIPPED_CONFIG"; then
  echo "install.sh: $SHIPPED_CONFIG missing or without its [storage] root line" >&2
  exit 1
fi
sed 's#^root = "var"$#root = "/var/lib/glowtriage"#' "$SHIPPED_CONFIG" \
  | put "$ETC/config.toml.dist" 0640 "root:$USER_NAME"
if [[ -f "$ETC/config.toml" ]]; then
  say "keeping existing $ETC/config.toml (compare with config.toml.dist after upgrades)"
else
  run install -m 0640 -o root -g "$USER_NAME" "$ETC/config.toml.dist" "$ETC/config.toml"
fi
if [[ $DRY_RUN -eq 0 ]]; then
  "$PREFIX/.venv/bin/triage" check-config --config "$ETC/config.toml"
else
  run "$PREFIX/.venv/bin/triage" check-config --config "$ETC/config.toml"
fi

say "systemd unit"
put "$UNIT_DIR/glowtriage.service" 0644 root:root <"$HERE/glowtriage.service"
DROPINS="$UNIT_DIR/glowtriage.service.d"
if [[ $GPU -eq 1 || $PORT104 -eq 1 ]]; then
  run install -d -m 0755 "$DROPINS"
fi
if [[ $GPU -eq 1 ]]; then
  put "$DROPINS/gpu.conf" 0644 root:root <<'EOF'
# Written by glowtriage install.sh --gpu: open the NVIDIA devices to the sandbox.
[Service]
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
ProtectKernelTunables=no
EOF
fi
if [[ $PORT104 -eq 1 ]]; then
  put "$DROPINS/port104.conf" 0644 root:root <<'EOF'
# Written by glowtriage install.sh --port104: allow binding the privileged DICOM port 104.
[Service]
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
EOF
fi
run systemctl daemon-reload
run systemctl enable glowtriage.service
if [[ $START -eq 1 ]]; then
  run systemctl restart glowtriage.service
  say "started; follow with: journalctl -fu glowtriage"
else
  say "enabled, not started: systemctl start glowtriage"
fi
