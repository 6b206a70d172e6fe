//! How the node's setup and run fail, and so with which exit code.

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The invocation or environment is wrong (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Something failed at run time (exit code 1).
    #[error("{0}")]
    Failed(String),
}
