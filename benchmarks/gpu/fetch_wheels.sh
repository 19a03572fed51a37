#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network): pulp, highspy and pydantic with their
# dependencies, at the versions this checkout's .venv holds, for the CPython versions a GPU
# machine may run, into benchmarks/gpu/wheels/ (ignored by git; it travels with the checkout,
# whose limit is 64 MiB). Run here, after `make test` has made .venv:
#     bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/gpu/wheels
mkdir -p "$out"
pins=$(.venv/bin/python -m pip freeze --disable-pip-version-check |
       grep -iE '^(pulp|highspy|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
for version in 3.10 3.11 3.12 3.13; do
    # shellcheck disable=SC2086
    pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$out" $pins
done
du -sh "$out"
