//! The gRPC test service (`proto/echo.proto`) for `sy-grpc`, through tonic's code generator.
//!
//! `cargo xtask` builds this crate before `setup` can install Debian's protoc, so on a fresh
//! machine there is none yet: the generator then runs the protoc that `protoc-bin-vendored`
//! carries. A `PROTOC` set by the caller, or one on `PATH`, wins.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| Path::new(&dir).join("protoc").is_file())
    });
    if std::env::var_os("PROTOC").is_none() && !on_path {
        let vendored = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: a build script is single-threaded; the variable is read by the generator
        // below, in this process.
        unsafe { std::env::set_var("PROTOC", vendored) };
    }
    tonic_prost_build::compile_protos("proto/echo.proto")?;
    Ok(())
}
