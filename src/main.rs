//! The `ccmgr` binary: a thin shell over [`ccmgr::cli`].
fn main() -> std::process::ExitCode {
    ccmgr::cli::main()
}
