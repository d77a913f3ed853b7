#!/usr/bin/env bash
# The test command: install what the tests need, run pytest, then each fuzz harness briefly.
#
#   scripts/test.sh [PYTEST ARGS...]
#
# On a fresh Debian machine as root it installs the interop peers (Debian packages dcmtk and
# orthanc) when they are missing, installs dicomagent in editable mode with its test and fuzz
# extras, runs `python3 -m pytest -q "$@"`, then runs every fuzz/*.py harness (atheris) for
# FUZZ_SECONDS seconds each (default 20; 0 skips fuzzing). Files in fuzz/ whose name starts
# with "_" are helpers, not harnesses. Exits non-zero if any step fails.
#
# Then the four benchmarks run briefly (BENCH=0 skips them).
#
# Environment: PYTHON (default python3), FUZZ_SECONDS (default 20), BENCH (default 1).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
DEBIAN_PACKAGES=(dcmtk orthanc gcc libc6-dev)   # gcc: bench/flushclose.c

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

# --- Debian packages: apt-get update once, and only when something is missing -------------
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "test.sh: installing Debian packages: ${missing[*]}"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "test.sh: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null
fi

# --- the package itself, with the test and fuzz extras -------------------------------------
"$PYTHON" -m pip install -q -e '.[test,fuzz]'

# --- tests and fuzzers: run them all, fail at the end if any failed ------------------------
failed=()

status=0
"$PYTHON" -m pytest -q "$@" || status=$?
((status == 0)) || failed+=("pytest (exit $status)")

shopt -s nullglob
harnesses=()
for f in fuzz/*.py; do
    [[ $(basename "$f") == _* ]] || harnesses+=("$f")
done
if ((FUZZ_SECONDS == 0)); then
    echo "fuzz: skipped (FUZZ_SECONDS=0)"
elif ((${#harnesses[@]} == 0)); then
    echo "fuzz: no harnesses in fuzz/ yet"
else
    scratch=$(mktemp -d)
    fuzz_failed=0
    for f in "${harnesses[@]}"; do
        name=$(basename "$f" .py)
        mkdir -p "$scratch/$name/artifacts"
        log="$scratch/$name/log"
        status=0
        # libFuzzer flags pass through atheris.Setup(sys.argv, ...).
        "$PYTHON" "$f" -max_total_time="$FUZZ_SECONDS" \
            -artifact_prefix="$scratch/$name/artifacts/" >"$log" 2>&1 || status=$?
        if ((status == 0)); then
            runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 || true)
            echo "fuzz $name: ok${runs:+ (${runs#Done })}"
        else
            echo "fuzz $name: FAILED (exit $status); last lines of its output:"
            tail -n 60 "$log" | sed 's/^/    /'
            failed+=("fuzz $name (exit $status)")
            fuzz_failed=1
        fi
    done
    if ((fuzz_failed)); then
        echo "fuzz: logs and crash inputs kept in $scratch"
    else
        rm -rf "$scratch"
    fi
fi

# --- benchmarks, briefly: they run our node beside DCMTK and Orthanc and fail loudly on a lost
# object or a wrong match count; the full runs are `python3 bench/NAME.py` (see README) ------
if [[ "${BENCH:-1}" == 0 ]]; then
    echo "bench: skipped (BENCH=0)"
else
    floor="dicomagent-nofsync,dicomagent-fsync,storescp,storescp-fsync,orthanc,python-floor,python-floor-fsync"
    for bench in "associations.py --n 300 --rounds 2 --warmup 50" "store.py --quick --servers $floor" \
                 "query.py --instances 20000 --queries 30 --rounds 3" "hotpath.py --small 300 --passes 1"; do
        name=${bench%% *}
        log=$(mktemp)
        status=0
        # shellcheck disable=SC2086
        "$PYTHON" bench/$bench >"$log" 2>&1 || status=$?
        if ((status == 0)); then
            echo "bench $name: ok"
            grep -E "^ratio|^ratios|^hotpath:|^bench: warning" "$log" | sed 's/^/    /' || true
        else
            echo "bench $name: FAILED (exit $status); last lines of its output:"
            tail -n 40 "$log" | sed 's/^/    /'
            failed+=("bench $name (exit $status)")
        fi
        rm -f "$log"
    done
fi

if ((${#failed[@]})); then
    echo "test.sh: failed: ${failed[*]}" >&2
    exit 1
fi
