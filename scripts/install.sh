#!/usr/bin/env bash
# Install the dicomagent daemon and command-line tool from this checkout.
#
#   scripts/install.sh && dicomagent serve
#
# Environment: PYTHON (default python3) picks the interpreter to install into.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

"$PYTHON" -m pip install -q .

# pyenv puts console scripts behind shims; make the new `dicomagent` command visible.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi

if ! command -v dicomagent >/dev/null 2>&1; then
    bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    echo "install.sh: installed, but $bindir is not on PATH; add it, or run: $PYTHON -m dicomagent serve" >&2
fi
