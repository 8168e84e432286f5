#!/usr/bin/env bash
# Usage: tests/shell/prereqs-libclang.sh
# scripts/prereqs must look for the libclang that bindgen loads: a machine with only
# libclang-cpp.so.14 (Debian's libclang-cpp14, without libclang-dev) lacks it and must
# get libclang-dev installed; libclang.so.1 or libclang-14.so must satisfy the check.
set -euo pipefail
cd "$(dirname "$0")/../.."
check() {
    PATINA_LIBCLANG_DIRS="$1" bash -c 'source <(sed -n "/^have_libclang()/,/^}/p" scripts/prereqs); have_libclang'
}
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/cpp-only" "$d/versioned" "$d/plain" "$d/llvm"
touch "$d/cpp-only/libclang-cpp.so.14" "$d/cpp-only/libclangBasic.a"
touch "$d/versioned/libclang-cpp.so.14" "$d/versioned/libclang-14.so.1"
touch "$d/plain/libclang.so.1"
touch "$d/llvm/libclang-14.0.6.so"
fail=0
if check "$d/cpp-only"; then echo "FAIL: libclang-cpp.so.14 alone was taken for libclang"; fail=1; fi
for ok in versioned plain llvm; do
    check "$d/$ok" || { echo "FAIL: $ok: libclang not found"; fail=1; }
done
[ "$fail" = 0 ] && echo "prereqs-libclang: ok"
exit $fail
