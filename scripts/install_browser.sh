#!/usr/bin/env bash
# Debian's Chromium for the end-to-end browser test (Playwright drives it; it never downloads a browser).
# Skipped when chromium is already there, or when apt-get is unavailable (the e2e test then skips with a reason).
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get; the browser test will be skipped" >&2; exit 0
fi
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq >/dev/null 2>&1 || true
$sudo_cmd apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 \
  || echo "install_browser: could not install chromium; the browser test will be skipped" >&2
exit 0
