//! `boxd`: one binary for every role. See `boxd --help`.

/// mimalloc instead of glibc's malloc: the control plane allocates from many threads at once
/// (Raft, gRPC, View updates), where glibc's arenas cost ~17% of the runtime's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    boxd::cli::main()
}
