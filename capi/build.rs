//! Gives libccmgr_service.so a SONAME, its own file name: a shared library in /usr/lib
//! without one is an error to Debian's lintian (`sharedobject-in-library-directory-missing-
//! soname`), and with none the linker would record the same name in a program's DT_NEEDED
//! anyway, so nothing that links it changes.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libccmgr_service.so");
}
