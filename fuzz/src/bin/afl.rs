//! The AFL++ driver: `ccmgr-fuzz-afl TARGET`, run by `afl-fuzz` (see fuzz/run.sh), feeds each
//! input to one target in persistent mode. A panic aborts, which AFL records as a crash.

fn main() {
    let target = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!(
            "usage: ccmgr-fuzz-afl TARGET; targets: {:?}",
            ccmgr_fuzz::targets::TARGETS
        );
        std::process::exit(2)
    });
    afl::fuzz!(|data: &[u8]| {
        ccmgr_fuzz::targets::run(&target, data);
    });
}
