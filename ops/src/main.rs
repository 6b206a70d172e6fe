//! `boxd`: one binary for every role. See `boxd --help`.

/// mimalloc instead of glibc's malloc: the control plane allocates from many threads at once
/// (Raft, gRPC, View updates), where glibc's arenas cost ~17% of the runtime's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits (and touches) its first arena eagerly by default: 6 MiB of resident memory
/// in every process, which is most of a `boxd vmm` process's own footprint. Arenas commit on
/// demand instead. Set from `.init_array`, i.e. before the first Rust allocation creates an
/// arena; `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still overrides nothing else.
#[used]
#[unsafe(link_section = ".init_array")]
static LAZY_ARENA_COMMIT: extern "C" fn() = {
    extern "C" fn lazy_arena_commit() {
        const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
        // SAFETY: runs once, single-threaded, before main; mi_option_set only stores a value.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    lazy_arena_commit
};

fn main() -> std::process::ExitCode {
    // Everything boxd writes — the replica, keys, VM directories — is its owner's alone unless
    // made public on purpose (a VM's tree: `image::public_dirs`, `with_public_umask`).
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    boxd::cli::main()
}
