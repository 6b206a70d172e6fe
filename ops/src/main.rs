//! `boxd`: one binary for every role. See `boxd --help`.

fn main() -> std::process::ExitCode {
    boxd::cli::main()
}
