//! The one error every operation returns: what kind of failure it is (so a front end can pick
//! an exit status or a gRPC code, and a client can tell whether to retry) and one sentence
//! that tells the user what to do.

use boxd_model::command::ApplyError;

/// What kind of failure an [`OpError`] is. Front ends map it: the SSH lobby to an exit
/// status, the gRPC API to a status code (named beside each kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range: fix the input
    /// (`INVALID_ARGUMENT`; the lobby's usage exit status).
    Invalid,
    /// No such VM, key or account, or it is not the caller's: the answer is the same on
    /// purpose (`NOT_FOUND`).
    NotFound,
    /// The name or key is taken (`ALREADY_EXISTS`).
    Exists,
    /// The credential does not allow it: a token's scope or read-only flag, a non-owner
    /// approving (`PERMISSION_DENIED`).
    Denied,
    /// A quota, the address pool or a rate limit is used up (`RESOURCE_EXHAUSTED`).
    Exhausted,
    /// The request is well formed but the state does not allow it: a VM that failed to
    /// start, the last key of an account (`FAILED_PRECONDITION`).
    Refused,
    /// The wait ran out; what was asked continues in the background (`DEADLINE_EXCEEDED`).
    Timeout,
    /// boxd could not be reached, is not initialised or is stopping: retrying later is safe
    /// (`UNAVAILABLE`).
    Unavailable,
}

/// Why an operation failed, in one sentence that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// The kind.
    pub kind: ErrorKind,
    /// The sentence for the user.
    pub message: String,
}

impl OpError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Bad input: `message` says what to type instead.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// The control plane could not be reached or failed (`why`); retrying is safe.
    pub fn unavailable(why: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::Unavailable,
            format!("the control plane is unavailable ({why}); try again in a moment"),
        )
    }

    /// Whether the same request may succeed later without change.
    pub fn retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
    }
}

impl From<ApplyError> for OpError {
    /// The log refused a command: its message is already for the user.
    fn from(e: ApplyError) -> Self {
        let kind = match &e {
            ApplyError::NotInitialized => ErrorKind::Unavailable,
            ApplyError::Invalid { .. } => ErrorKind::Invalid,
            ApplyError::NotFound { .. } | ApplyError::NotYours { .. } => ErrorKind::NotFound,
            ApplyError::NameTaken { .. }
            | ApplyError::AccountNameTaken { .. }
            | ApplyError::KeyTaken { .. }
            | ApplyError::IdConflict { .. } => ErrorKind::Exists,
            ApplyError::QuotaExceeded { .. }
            | ApplyError::PoolExhausted { .. }
            | ApplyError::TokenLimit { .. } => ErrorKind::Exhausted,
            ApplyError::AlreadyInitialized { .. }
            | ApplyError::OwnerClaimed
            | ApplyError::LastKey
            | ApplyError::Expired { .. }
            | ApplyError::CannotPlace { .. } => ErrorKind::Refused,
        };
        Self::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_the_logs_message_and_get_a_kind() {
        let e = OpError::from(ApplyError::QuotaExceeded { limit: 3 });
        assert_eq!(e.kind, ErrorKind::Exhausted);
        assert_eq!(
            e.to_string(),
            "quota reached: this account may own 3 VMs; remove one first"
        );
        let e = OpError::from(ApplyError::NotYours {
            what: "VM".into(),
            id: "x".into(),
        });
        assert_eq!(e.kind, ErrorKind::NotFound, "another's VM looks missing");
        assert!(!e.retryable());
        assert!(OpError::unavailable("no leader").retryable());
        assert_eq!(
            OpError::from(ApplyError::LastKey).kind,
            ErrorKind::Refused,
            "the rest are refusals"
        );
    }
}
