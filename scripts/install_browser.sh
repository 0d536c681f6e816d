#!/usr/bin/env bash
# Install what the browser test (tests/browser) needs: Debian's chromium and the playwright package.
# Idempotent, and always exits 0: where something cannot be installed, the browser test skips with a
# reason. Playwright's own browser download is not used (it needs the internet and Playwright's CDN);
# the test drives the system chromium instead. Usage: scripts/install_browser.sh
set -u
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { echo "[install-browser] $*"; }

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  say "chromium present"
elif command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if [ "$sudo" = none ]; then
    say "not root and no password-less sudo: cannot install chromium (the browser test will skip)"
  else
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; } \
      || say "apt-get could not install chromium (the browser test will skip)"
    command -v chromium >/dev/null 2>&1 && say "chromium installed"
  fi
else
  say "no apt-get here: install chromium yourself to run the browser test"
fi

if [ -x "$VENV/bin/python" ]; then
  if "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    say "playwright present"
  else
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "playwright>=1.45" \
      && say "playwright installed" || say "pip could not install playwright (the browser test will skip)"
  fi
else
  say "no $VENV yet: run scripts/install.sh first"
fi
exit 0
