#!/usr/bin/env bash
# Make the environment on a bare machine: Debian peers (Orthanc, dcmtk, dicom3tools, promtool),
# a virtualenv in .venv, torch (the CPU wheel where there is no NVIDIA GPU), and glowtriage itself.
# Idempotent and quick when nothing changed: the second run only checks stamps.
set -euo pipefail
cd "$(dirname "$0")/.."

# fuse3: libfuse 3 for the power-cut filesystem of tests/integration/test_powercut.py (training/harness/powercut.py)
APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk dicom3tools prometheus systemd openssl fuse3)
need_apt=()
for tool in Orthanc:orthanc storescu:dcmtk dciodvfy:dicom3tools promtool:prometheus systemd-analyze:systemd openssl:openssl fusermount3:fuse3; do
  bin=${tool%%:*}; pkg=${tool##*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_apt+=("$pkg")
done
# Orthanc's DICOMweb plug-in is a library, not a command: the STOW-RS destination's tests load it.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
  || compgen -G '/usr/lib/orthanc/libOrthancDicomWeb.so*' >/dev/null || need_apt+=(orthanc-dicomweb)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  # Orthanc's Debian package starts a system service on port 4242/8042; tests run their own.
  ($SUDO service orthanc stop || true) >/dev/null 2>&1
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi

stamp=.venv/.glowtriage-stamp
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "bootstrap: NVIDIA GPU found: installing a CUDA build of torch"
      .venv/bin/pip install -q 'torch>=2.4,<2.15'
    else
      echo "bootstrap: no GPU: installing the CPU wheel of torch 2.13.0"
      .venv/bin/pip install -q torch==2.13.0
    fi
  fi
  echo "bootstrap: installing glowtriage and its dependencies"
  .venv/bin/pip install -q -e '.[dev]' 2>&1 | grep -v -E '^WARNING: Location|^\s*$' || true
  .venv/bin/python -c 'import torch, pydicom, pynetdicom, highdicom, SimpleITK, triage, training' || {
    echo "bootstrap: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
