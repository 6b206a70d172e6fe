//! Who calls: the token in `authorization: Bearer <JWT>`, checked against the View (its key,
//! that it is live) and the clock; the caller goes into the request's extensions for the
//! service. Any failure is `UNAUTHENTICATED` with a message that says what to do.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use boxd_model::tokens::{self, TokenError};
use boxd_operations::{Caller, Operations};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks each call's token.
#[derive(Clone)]
pub struct Auth {
    ops: Arc<Operations>,
}

impl Auth {
    /// Checks tokens against `ops`' View.
    pub fn new(ops: Arc<Operations>) -> Self {
        Self { ops }
    }

    /// The caller `header` (an `authorization` value) proves, at `now` (milliseconds).
    pub fn check(&self, header: Option<&[u8]>, now: u64) -> Result<Caller, Status> {
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "no token: send `authorization: Bearer <token>`; make one with `ssh <zone> token create`",
            ));
        };
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <token>`")
            })?;
        let view = self.ops.view().current();
        let zone = view.zone().unwrap_or("");
        let verified = tokens::verify(
            token,
            zone,
            now,
            |kid| view.token_key(kid).map(<[u8]>::to_vec),
            |_| true,
        )
        .and_then(|v| {
            if view.token_live(v.id, v.account) {
                Ok(v)
            } else {
                Err(TokenError::Revoked)
            }
        })
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(Caller::token(verified))
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        let caller = self.check(header.as_deref(), now_ms())?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}
