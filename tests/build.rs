//! The gRPC test service (`proto/echo.proto`) for `sy-grpc`, through tonic's code generator
//! (protoc is installed by `cargo xtask setup`, as the etcd client needs it too).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    tonic_prost_build::compile_protos("proto/echo.proto")
}
