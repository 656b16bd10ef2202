#!/usr/bin/env bash
# The browser the browser tests drive (tests/browser.py): the system Chromium and its chromedriver,
# from Debian's packages. Nothing is downloaded when the tests run, so they must be here first.
set -euo pipefail

have_browser() {
    { command -v chromium || command -v chromium-browser; } >/dev/null && command -v chromedriver >/dev/null
}

if have_browser; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: Chromium or chromedriver is missing; as root run: apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# -qq keeps the progress quiet; apt still prints its errors, and set -e stops on them.
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null

if ! have_browser; then
    echo "install-browser: apt-get installed chromium and chromium-driver, but chromium and chromedriver are not on PATH" >&2
    exit 1
fi
