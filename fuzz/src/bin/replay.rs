//! Replays saved inputs without AFL: `ccmgr-fuzz-replay TARGET FILE...` runs each file through
//! the target and says how long it took, to reproduce and minimise a crash by hand.
//! `ccmgr-fuzz-replay --seeds TARGET DIR` writes the seeds only code can make into DIR.

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(target) = args.next() else {
        eprintln!("usage: ccmgr-fuzz-replay TARGET FILE...");
        std::process::exit(2)
    };
    if target == "--seeds" {
        let (Some(target), Some(dir)) = (args.next(), args.next()) else {
            eprintln!("usage: ccmgr-fuzz-replay --seeds TARGET DIR");
            std::process::exit(2)
        };
        for (n, seed) in ccmgr_fuzz::targets::generated_seeds(&target)
            .iter()
            .enumerate()
        {
            let path = std::path::Path::new(&dir).join(format!("generated-{n}"));
            std::fs::write(&path, seed).expect("write a seed");
        }
        return;
    }
    for file in args {
        let data = std::fs::read(&file).unwrap_or_else(|e| {
            eprintln!("cannot read {file}: {e}");
            std::process::exit(2)
        });
        let started = Instant::now();
        ccmgr_fuzz::targets::run(&target, &data);
        println!("{file}: ok in {:?}", started.elapsed());
    }
}
