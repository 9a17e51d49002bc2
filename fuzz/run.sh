#!/usr/bin/env bash
# Fuzzes ccmgr's parsers of outside input with AFL++ (through afl.rs, on the stable toolchain).
#
#   fuzz/run.sh TARGET SECONDS    one target for SECONDS
#   fuzz/run.sh all SECONDS       every target in turn, SECONDS each
#
# Targets: config duration notify keeper segment control (fuzz/src/targets.rs says what each feeds
# where). Needs cargo-afl (`cargo install cargo-afl`, then `cargo afl config --build` once).
# The corpus and AFL's state stay in fuzz/out/TARGET between runs (a new run resumes it).
# Every crash or hang found is copied to tests/fuzz_regressions/TARGET/, where `cargo test
# --test fuzz_regressions` replays it through the same target: it fails until it is fixed.
# Each run's figures are appended to fuzz/out/summary.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(config duration notify keeper segment control)
usage() { echo "usage: fuzz/run.sh TARGET|all SECONDS (targets: ${all_targets[*]})" >&2; exit 2; }
[ $# -eq 2 ] || usage
target=$1 seconds=$2
case "$seconds" in ''|*[!0-9]*) usage ;; esac
if [ "$target" = all ]; then
    targets=("${all_targets[@]}")
else
    case " ${all_targets[*]} " in *" $target "*) targets=("$target") ;; *) usage ;; esac
fi
command -v cargo-afl >/dev/null || { echo "cargo-afl is missing: cargo install cargo-afl && cargo afl config --build" >&2; exit 1; }

# Its own target dir: instrumented builds must not evict the normal build's artifacts.
export CARGO_TARGET_DIR=target/afl
cargo afl build --release -p ccmgr-fuzz --features afl --bin ccmgr-fuzz-afl --bin ccmgr-fuzz-replay
bin=$CARGO_TARGET_DIR/release/ccmgr-fuzz-afl
replay=$CARGO_TARGET_DIR/release/ccmgr-fuzz-replay

# No UI (logs instead), no core pinning (the cores are shared), no core-dump pattern demands.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_AUTORESUME=1 AFL_FAST_CAL=1
mkdir -p fuzz/out
summary=fuzz/out/summary.tsv
[ -e "$summary" ] || printf 'date\ttarget\tseconds\texecs\tcorpus\tcrashes\thangs\n' >"$summary"

for t in "${targets[@]}"; do
    out=fuzz/out/$t
    seeds=$(mktemp -d)
    cp fuzz/seeds/"$t"/* "$seeds"/ 2>/dev/null || true
    "$replay" --seeds "$t" "$seeds"
    [ -n "$(ls -A "$seeds")" ] || printf 'x' >"$seeds/empty"
    echo "--- fuzzing $t for ${seconds}s"
    # -t: an input that takes over 3 s is a hang (a reader waits up to 1 s for a lock, a probe reads twice); -m: over 1 GiB of memory is a crash.
    cargo afl fuzz -V "$seconds" -t 3000 -m 1024 -i "$seeds" -o "$out" -- "$bin" "$t" \
        >"fuzz/out/$t.log" 2>&1 || { tail -30 "fuzz/out/$t.log"; exit 1; }
    rm -rf "$seeds"
    # The segment target's files live in a private temporary run directory per fuzzing
    # process (see fuzz_run_dir in fuzz/src/targets.rs), removed with the system's temp files.
    stats=$out/default/fuzzer_stats
    stat() { sed -n "s/^$1 *: *//p" "$stats"; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$(stat run_time)" \
        "$(stat execs_done)" "$(stat corpus_count)" "$(stat saved_crashes)" "$(stat saved_hangs)" \
        | tee -a "$summary"
    for kind in crashes hangs; do
        for f in "$out"/default/"$kind"/id:*; do
            [ -e "$f" ] || continue
            dest=tests/fuzz_regressions/$t
            mkdir -p "$dest"
            cp "$f" "$dest/$kind-$(sha1sum "$f" | cut -c1-12)"
            echo "found: $dest/$kind-$(sha1sum "$f" | cut -c1-12)"
        done
    done
done
