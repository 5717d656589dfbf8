#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each for a bounded time; fails on a crash, a
# hang or a runaway allocation, printing the reproducer.
#   scripts/fuzz.sh                    every target, FUZZ_SECS (default 25) each
#   scripts/fuzz.sh sio_packet 600     one target for ten minutes
#   scripts/fuzz.sh --build            build only (prints how long it took)
# FUZZ_SANITIZER=address for ASan (slower to build and to run; safe Rust rarely needs it).
# FUZZ_TOOLCHAIN=nightly|stable picks the toolchain instead of the default choice below.
# Everything it writes is under target/fuzz: the build, the grown corpus (the repo's seeds in
# fuzz/corpus/ are only read), the crash artifacts and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

targets=(sio_packet event_payload domain)
secs="${FUZZ_SECS:-25}"
build_only=0
case "${1:-}" in
  --build) build_only=1 ;;
  "") ;;
  *) targets=("$1"); secs="${2:-$secs}" ;;
esac
sanitizer="${FUZZ_SANITIZER:-none}"
out="$root/target/fuzz"
mkdir -p "$out/logs"

command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz: cargo-fuzz is missing (scripts/setup.sh --test installs it)" >&2; exit 1; }

# cargo-fuzz's instrumentation (and -Zsanitizer for ASan) wants nightly: a nightly toolchain
# when rustup has one that works, otherwise the stable compiler with RUSTC_BOOTSTRAP=1 (a fresh
# machine may lack nightly and cannot download it). Each candidate first compiles an empty
# library with the same instrumentation (no link: libFuzzer comes with the build), so a toolchain
# that cannot fails here in a second, not after a long build.
use_toolchain() {
  case "$1" in
    nightly) export RUSTUP_TOOLCHAIN=nightly; unset RUSTC_BOOTSTRAP ;;
    stable) export RUSTUP_TOOLCHAIN=stable RUSTC_BOOTSTRAP=1 ;;
    *) echo "fuzz: FUZZ_TOOLCHAIN must be nightly or stable, not $1" >&2; exit 1 ;;
  esac
  local probe="$out/probe" extra=()
  [ "$sanitizer" = none ] || extra=("-Zsanitizer=$sanitizer")
  mkdir -p "$probe"
  echo 'pub fn probe(x: u8) -> bool { x > 1 }' >"$probe/lib.rs"
  rustc --edition 2021 --crate-type lib --emit obj -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters "${extra[@]}" \
    "$probe/lib.rs" -o "$probe/lib.o" >"$out/logs/probe-$1.log" 2>&1
}
toolchain="${FUZZ_TOOLCHAIN:-}"
if [ -n "$toolchain" ]; then
  use_toolchain "$toolchain" || { cat "$out/logs/probe-$toolchain.log" >&2; echo "fuzz: the $toolchain toolchain cannot build instrumented code" >&2; exit 1; }
elif use_toolchain nightly; then
  toolchain=nightly
elif use_toolchain stable; then
  toolchain=stable
else
  cat "$out/logs/probe-nightly.log" "$out/logs/probe-stable.log" >&2
  echo "fuzz: neither a nightly toolchain nor stable with RUSTC_BOOTSTRAP=1 can build instrumented code" >&2
  exit 1
fi
# The fuzz crate is its own workspace with its own target dir; a CARGO_TARGET_DIR meant for the
# main build would mix the instrumented artifacts into it.
unset CARGO_TARGET_DIR
# --dev: the instrumented dependency tree (database drivers, TLS, HTTP) builds unoptimized, far
# quicker than a release build; the targets run slower, which a bounded CI run can
# afford (FUZZ_PROFILE=release for long local runs).
profile_flag=--dev
[ "${FUZZ_PROFILE:-dev}" = release ] && profile_flag=--release
flags=(--sanitizer "$sanitizer" --target-dir "$out" "$profile_flag")

started=$SECONDS
if ! cargo fuzz build "${flags[@]}" >"$out/logs/build.log" 2>&1; then
  tail -n 40 "$out/logs/build.log" >&2
  echo "fuzz: building the fuzz targets failed with $(rustc --version) ($toolchain$([ "$toolchain" = stable ] && echo ', RUSTC_BOOTSTRAP=1'))" >&2
  exit 1
fi
echo "fuzz: built with $(rustc --version) ($toolchain) in $((SECONDS - started)) s"
[ "$build_only" = 1 ] && exit 0

failed=0
for t in "${targets[@]}"; do
  # The grown corpus only adds up run after run (a 4-minute run left 28,000 inputs): past a
  # bound it starts again from the seeds rather than fill the disk of a CI machine.
  if [ -d "$out/corpus/$t" ] && [ "$(ls "$out/corpus/$t" | wc -l)" -gt 100000 ]; then rm -rf "$out/corpus/$t"; fi
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  log="$out/logs/$t.log"
  # The grown corpus comes first (libFuzzer writes new inputs there), the repo's seeds second.
  # -timeout: an input taking 10 s is a hang; -rss_limit_mb: a parser that allocates without
  # bound stops the run (both are failures, with the input saved like a crash).
  if cargo fuzz run "${flags[@]}" "$t" "$out/corpus/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
      -dict=fuzz/sio.dict -artifact_prefix="$out/artifacts/$t/" >"$log" 2>&1; then
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    echo "fuzz: $t: ok, ${execs:-?} runs in $secs s (${rate:-?}/s), corpus $(ls "$out/corpus/$t" | wc -l) + $(ls "fuzz/corpus/$t" | wc -l) seeds"
  else
    failed=1
    grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY)' "$log" | head -n 5 >&2 || true
    tail -n 30 "$log" >&2
    reproducer="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    echo "fuzz: $t FAILED; log $log" >&2
    if [ -n "$reproducer" ]; then
      echo "fuzz: reproducer $reproducer; replay it with:" >&2
      echo "  $([ "$toolchain" = stable ] && echo 'RUSTC_BOOTSTRAP=1 ')cargo +$toolchain fuzz run ${flags[*]} $t $reproducer" >&2
    fi
  fi
done
exit "$failed"
