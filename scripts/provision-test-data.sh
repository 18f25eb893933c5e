#!/usr/bin/env bash
# Provision the data the test suite reads: Fashion-MNIST's IDX files (Debian package
# dataset-fashion-mnist, installed in /usr/share/datasets/fashion-mnist).
#
#   APT=auto  (default) install the package with apt-get when it is missing, as root or via
#             password-less sudo; otherwise say what to install and go on
#   APT=false never install; say what is missing and go on
#
# Going on without the data is deliberate: the tests that need it carry the pytest marker
# `fashion_mnist` and skip with its reason, except under CI=true, where they fail.
set -euo pipefail
ROOT=/usr/share/datasets/fashion-mnist
APT=${APT:-auto}
case "$APT" in
  auto|true|1|yes|on|false|0|no|off) ;;
  *) echo "error: APT=$APT: use APT=auto (install when missing) or APT=false" >&2; exit 2 ;;
esac

have_data() {
  local f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
           t10k-labels-idx1-ubyte; do
    [ -f "$ROOT/$f" ] || [ -f "$ROOT/$f.gz" ] || return 1
  done
}

if have_data; then
  echo "test data: Fashion-MNIST found in $ROOT"
  exit 0
fi

explain() {
  echo "test data: Fashion-MNIST is not in $ROOT ($1)." >&2
  echo "  Install it with: sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)" >&2
  echo "  or copy the four IDX files (train-images-idx3-ubyte.gz, ...) into $ROOT." >&2
  echo "  The tests marked 'fashion_mnist' will skip (and fail under CI=true)." >&2
}

case "$APT" in
  false|0|no|off) explain "APT=$APT: not installing"; exit 0 ;;
esac

if ! command -v apt-get >/dev/null 2>&1; then
  explain "no apt-get on this machine"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  explain "installing needs root; run make as root or with password-less sudo"
  exit 0
fi

echo "test data: installing dataset-fashion-mnist with apt-get"
export DEBIAN_FRONTEND=noninteractive
if "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq dataset-fashion-mnist \
    && have_data; then
  echo "test data: Fashion-MNIST installed in $ROOT"
else
  explain "apt-get could not install dataset-fashion-mnist"
fi
