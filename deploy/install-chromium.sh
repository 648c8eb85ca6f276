#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the real-browser test (tests/e2e/test_up.py), when
# they are missing. Best effort: without them (no apt, no root, no mirror) that one test skips.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; the browser test will skip" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install-chromium: not root and no passwordless sudo; the browser test will skip" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
packages="chromium chromium-driver"
if ! $SUDO apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null 2>&1
  if ! $SUDO apt-get install -y -q --no-install-recommends $packages >/dev/null 2>&1; then
    echo "install-chromium: apt-get could not install $packages; the browser test will skip" >&2
    exit 1
  fi
fi
echo "install-chromium: $(chromium --version 2>/dev/null)"
