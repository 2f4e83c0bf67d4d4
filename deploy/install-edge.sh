#!/usr/bin/env bash
# Install the fedge edge agent on a device (Debian/Ubuntu/Raspberry Pi OS, x86_64 or aarch64) as a systemd service.
#
#   sudo deploy/install-edge.sh --superlink superlink.example.org:9093 --device-id edge-0 \
#       --certs certs/ --video /dev/video0 --audio /var/lib/fedge/inbox/mic.wav
#
# --certs is the folder `fedge cloud certs` wrote on the cloud (only ca.crt and supernodes/<device-id>/auth.key are
# copied; the CA key never leaves the cloud). What it does, in order:
#   1. a system user `fedge` (no login, no home outside /var/lib/fedge; in the video and audio groups)
#   2. a virtualenv in <prefix>/venv with fedge's `edge` extra (CPU torch for this architecture; no Ray)
#   3. /etc/fedge/ca.crt, /etc/fedge/auth/auth.key (0600, owned by fedge), /etc/fedge/edge.env
#   4. /etc/systemd/system/fedge-edge.service, enabled and started
# Idempotent: re-running upgrades the venv and keeps an existing edge.env unless --force.
# --root DIR installs into a staging tree instead of / (no user, no systemctl): what the tests use.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(cd "$HERE/.." && pwd)"            # the fedge source tree (pyproject.toml, constraints.txt)
PREFIX=/opt/fedge
ROOT=""
SUPERLINK="" DEVICE_ID="" CERTS="" VIDEO="" AUDIO="" EXTRA=""
PYTHON="${PYTHON:-python3}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
SKIP_VENV=0 NO_START=0 FORCE=0

die() { echo "install-edge: $*" >&2; exit 2; }
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) SUPERLINK="${2:?}"; shift 2 ;;
    --device-id) DEVICE_ID="${2:?}"; shift 2 ;;
    --certs) CERTS="${2:?}"; shift 2 ;;
    --video) VIDEO="${2:?}"; shift 2 ;;
    --audio) AUDIO="${2:?}"; shift 2 ;;
    --extra-args) EXTRA="${2?}"; shift 2 ;;
    --prefix) PREFIX="${2:?}"; shift 2 ;;
    --root) ROOT="${2:?}"; shift 2 ;;
    --python) PYTHON="${2:?}"; shift 2 ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    --no-start) NO_START=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$SUPERLINK" ] || die "--superlink HOST:PORT is required"
[[ "$SUPERLINK" =~ ^[A-Za-z0-9._-]+:[0-9]{1,5}$ ]] || die "--superlink '$SUPERLINK' is not HOST:PORT"
[ -n "$DEVICE_ID" ] || die "--device-id NAME is required"
[[ "$DEVICE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]] || die "--device-id '$DEVICE_ID': letters, digits, '.', '_', '-'"
[ -n "$CERTS" ] || die "--certs DIR (from \`fedge cloud certs\`) is required"
[ -f "$CERTS/ca.crt" ] || die "no CA certificate at $CERTS/ca.crt"
KEY="$CERTS/supernodes/$DEVICE_ID/auth.key"
[ -f "$KEY" ] || die "no auth key for '$DEVICE_ID' at $KEY (run: fedge cloud certs --out $CERTS -n $DEVICE_ID)"
[ -n "$VIDEO$AUDIO" ] || die "give at least one source: --video SRC and/or --audio SRC"
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then die "run as root (or stage into a folder with --root DIR)"; fi

ETC="$ROOT/etc/fedge"
UNIT_DIR="$ROOT/etc/systemd/system"
VENV="$ROOT$PREFIX/venv"

# 1. the unprivileged user (skipped when staging)
if [ -z "$ROOT" ]; then
  if ! id fedge >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/fedge --no-create-home --shell /usr/sbin/nologin fedge
  fi
  for g in video audio; do getent group "$g" >/dev/null && usermod -aG "$g" fedge; done
  OWNER=fedge
else
  OWNER="$(id -un)"
fi

# 2. the virtualenv: CPU torch for this architecture first, then the edge extra pinned by constraints.txt
if [ "$SKIP_VENV" = 0 ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11 (set --python)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  case "$(uname -m)" in
    x86_64|amd64) "$VENV/bin/pip" install -q -c "$SRC/constraints.txt" --index-url "$TORCH_CPU_INDEX" torch==2.13.0 ;;
    *) "$VENV/bin/pip" install -q -c "$SRC/constraints.txt" torch==2.13.0 ;;  # aarch64: PyPI's wheel is CPU-only
  esac
  "$VENV/bin/pip" install -q -c "$SRC/constraints.txt" "$SRC[edge]"
  "$VENV/bin/fedge" edge --help >/dev/null
fi

# 3. certificates, the node key and the settings
install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/auth"
install -m 0644 "$CERTS/ca.crt" "$ETC/ca.crt"
install -m 0600 "$KEY" "$ETC/auth/auth.key"
[ -z "$ROOT" ] && chown -R "$OWNER:$OWNER" "$ETC/auth"
SOURCES=""
[ -n "$VIDEO" ] && SOURCES="--video $VIDEO"
[ -n "$AUDIO" ] && SOURCES="${SOURCES:+$SOURCES }--audio $AUDIO"
if [ ! -f "$ETC/edge.env" ] || [ "$FORCE" = 1 ]; then
  umask 027
  cat > "$ETC/edge.env" <<ENV
# written by deploy/install-edge.sh; see deploy/systemd/edge.env.example
FEDGE_SUPERLINK=$SUPERLINK
FEDGE_DEVICE_ID=$DEVICE_ID
FEDGE_SOURCES=$SOURCES
FEDGE_EXTRA_ARGS=$EXTRA
ENV
  umask 022
else
  echo "install-edge: keeping existing $ETC/edge.env (use --force to rewrite it)"
fi

# 4. the unit (its paths follow --prefix), enabled and started
install -d -m 0755 "$UNIT_DIR"
sed "s#/opt/fedge/venv#$PREFIX/venv#g" "$HERE/systemd/fedge-edge.service" > "$UNIT_DIR/fedge-edge.service"
chmod 0644 "$UNIT_DIR/fedge-edge.service"
if [ -z "$ROOT" ]; then
  systemctl daemon-reload
  systemctl enable fedge-edge.service
  if [ "$NO_START" = 0 ]; then systemctl restart fedge-edge.service; fi
  echo "install-edge: running; logs: journalctl -u fedge-edge -f"
else
  echo "install-edge: staged into $ROOT"
fi
