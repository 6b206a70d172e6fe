//! Signing in with OpenID Connect to link an SSH key: the HTTPS front door's relying party.
//!
//! An unknown key gets a registration link; its page (boxd-dataplane `https::site`) has a
//! button to `/register/<code>/login`, which [`SignIn::start`] answers with a redirect to the
//! provider (authorization code flow with PKCE, `state` bound to the code and to the browser,
//! `nonce`; `state.rs`). The provider sends the browser back to `/register/callback`;
//! [`SignIn::finish`] checks the state, trades the code for tokens, verifies the ID token
//! (signature against the provider's key set, fetched again once when a `kid` is unknown;
//! `iss`, `aud`, `exp`, `nonce`), checks the email domain when `allowed_email_domains` is set,
//! and links the key to the person's account (`Operations::link_identity`: `iss` + `sub`).
//! Built on the `openidconnect` crate; see DESIGN.md.

mod http;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxd_operations::{Approved, ErrorKind, Operations, SignedIn};
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, IssuerUrl,
    Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, SignatureVerificationError,
};
use serde::{Deserialize, Serialize};

pub use self::http::{HttpClient, HttpError};
use self::state::{Callback, Refused, StateKey};

/// `[identity]`: the OpenID provider people sign in with to link a key. Without an issuer
/// (the default) the cluster's owner approves keys instead.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Issuer URL (its `/.well-known/openid-configuration` is read); empty: no sign-in.
    pub issuer: String,
    /// This cluster's client id at the provider.
    pub client_id: String,
    /// Its client secret, or empty with `client_secret_file`.
    pub client_secret: String,
    /// A file holding the client secret (surrounding whitespace ignored).
    pub client_secret_file: PathBuf,
    /// Only people whose verified email is in one of these domains may link keys; empty: any.
    pub allowed_email_domains: Vec<String>,
    /// The provider's name on the pages ("Sign in with …"); empty: the issuer's host.
    pub display_name: String,
    /// PEM certificates to trust for the provider besides the system's.
    pub ca_file: PathBuf,
}

impl IdentityConfig {
    /// Whether sign-in is configured.
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }

    /// Checks the fields, reading the secret file: the secret, or what is wrong and with which
    /// field.
    pub fn secret(&self) -> Result<String, (&'static str, String)> {
        let url = url::Url::parse(&self.issuer)
            .map_err(|e| ("identity.issuer", format!("{}: {e}", self.issuer)))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err((
                "identity.issuer",
                format!("{} is not an https URL", self.issuer),
            ));
        }
        if self.client_id.is_empty() {
            return Err(("identity.client_id", "the issuer needs a client id".into()));
        }
        let secret = match (
            self.client_secret.is_empty(),
            self.client_secret_file.as_os_str().is_empty(),
        ) {
            (false, true) => self.client_secret.clone(),
            (true, false) => std::fs::read_to_string(&self.client_secret_file)
                .map_err(|e| {
                    (
                        "identity.client_secret_file",
                        format!("{}: {e}", self.client_secret_file.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (false, false) => {
                return Err((
                    "identity.client_secret",
                    "give client_secret or client_secret_file, not both".into(),
                ));
            }
            (true, true) => {
                return Err((
                    "identity.client_secret",
                    "the issuer needs a client secret (or client_secret_file)".into(),
                ));
            }
        };
        if secret.is_empty() {
            return Err(("identity.client_secret", "the secret is empty".into()));
        }
        Ok(secret)
    }

    /// The name shown on buttons.
    pub fn name(&self) -> String {
        if !self.display_name.is_empty() {
            return self.display_name.clone();
        }
        url::Url::parse(&self.issuer)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| self.issuer.clone())
    }
}

/// Where `/register/<code>/login` sends the browser, and the cookie it sets.
#[derive(Debug)]
pub struct Start {
    /// The provider's authorization URL.
    pub location: String,
    /// A `Set-Cookie` value.
    pub cookie: String,
}

/// A key linked by signing in.
#[derive(Debug)]
pub struct Linked {
    /// What was linked to which account.
    pub approved: Approved,
    /// The email the provider gave, if any.
    pub email: Option<String>,
}

/// A sign-in that did not link anything: an error page's status, title and what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status.
    pub status: u16,
    /// Page title.
    pub title: String,
    /// What happened and what to do.
    pub detail: String,
}

impl Failure {
    fn new(status: u16, title: &str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title: title.to_owned(),
            detail: detail.into(),
        }
    }
}

/// How long a discovered provider (endpoints and key set) is used before it is read again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// Least time between two reads of the key set for an unknown `kid`.
const REFRESH_GAP: Duration = Duration::from_secs(10);
/// Deadline of one request to the provider.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The relying party of one cluster (one per proxy process; every proxy can finish a sign-in
/// any other started).
pub struct SignIn {
    cfg: IdentityConfig,
    issuer: IssuerUrl,
    secret: String,
    redirect: RedirectUrl,
    key: StateKey,
    http: HttpClient,
    provider: tokio::sync::Mutex<Option<(CoreProviderMetadata, Instant)>>,
    ops: Arc<Operations>,
    rt: tokio::runtime::Handle,
}

impl SignIn {
    /// The relying party for `cfg`, whose callback is `redirect`
    /// (`https://<zone>/register/callback`). Its futures run on `rt`.
    pub fn new(
        cfg: &IdentityConfig,
        redirect: &str,
        ops: Arc<Operations>,
        rt: tokio::runtime::Handle,
    ) -> Result<Arc<Self>, String> {
        let secret = cfg.secret().map_err(|(f, why)| format!("{f}: {why}"))?;
        let issuer =
            IssuerUrl::new(cfg.issuer.clone()).map_err(|e| format!("identity.issuer: {e}"))?;
        let redirect = RedirectUrl::new(redirect.to_owned()).map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            key: StateKey::new(&secret),
            http: HttpClient::new(&cfg.ca_file, HTTP_TIMEOUT)?,
            cfg: cfg.clone(),
            issuer,
            secret,
            redirect,
            provider: tokio::sync::Mutex::new(None),
            ops,
            rt,
        }))
    }

    /// The provider's name for the pages.
    pub fn name(&self) -> String {
        self.cfg.name()
    }

    /// Reads the provider's configuration now, so a wrong issuer shows in the log at start.
    pub async fn discover(self: &Arc<Self>) -> Result<(), String> {
        let me = Arc::clone(self);
        let run = self
            .rt
            .spawn(async move { me.provider(false).await.map(drop) });
        run.await.map_err(|e| e.to_string())?.map_err(|f| f.detail)
    }

    /// `/register/<code>/login`: where to send the browser.
    pub async fn start(self: &Arc<Self>, code: &str) -> Result<Start, Failure> {
        let me = Arc::clone(self);
        let code = code.to_owned();
        self.rt
            .spawn(async move { me.start_here(&code).await })
            .await
            .unwrap_or_else(|e| Err(internal(&e)))
    }

    /// `/register/callback?<query>` with the request's `Cookie` header: the key linked.
    pub async fn finish(self: &Arc<Self>, query: &str, cookies: &str) -> Result<Linked, Failure> {
        let me = Arc::clone(self);
        let (query, cookies) = (query.to_owned(), cookies.to_owned());
        self.rt
            .spawn(async move { me.finish_here(&query, &cookies).await })
            .await
            .unwrap_or_else(|e| Err(internal(&e)))
    }

    async fn start_here(&self, code: &str) -> Result<Start, Failure> {
        let pending = self
            .ops
            .pending_key(code)
            .await
            .map_err(|e| pending_failure(&e))?;
        if pending.expired {
            return Err(expired_link());
        }
        let meta = self.provider(false).await?;
        let (state, binding) = self.key.start(code, now_ms());
        let nonce = self.key.nonce(&state);
        let verifier = PkceCodeVerifier::new(self.key.verifier(&state));
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&verifier);
        let client = self.client(meta);
        let (url, _, _) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                move || CsrfToken::new(state),
                move || Nonce::new(nonce),
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        let cookie = format!(
            "{}={binding}; Path=/register/; Max-Age={}; Secure; HttpOnly; SameSite=Lax",
            state::cookie_name(code),
            state::SIGN_IN_TTL_MS / 1000
        );
        Ok(Start {
            location: url.to_string(),
            cookie,
        })
    }

    async fn finish_here(&self, query: &str, cookies: &str) -> Result<Linked, Failure> {
        let again = "Open your registration link again and sign in from there.";
        let (code, state, binding) = match Callback::parse(query, cookies) {
            Ok(Callback::Code {
                code,
                state,
                binding,
            }) => (code, state, binding),
            Ok(Callback::Error { error, description }) => {
                return Err(Failure::new(
                    403,
                    "Sign-in did not finish",
                    format!(
                        "{} answered: {error}{}{description}. {again}",
                        self.name(),
                        if description.is_empty() { "" } else { ": " }
                    ),
                ));
            }
            Err(why) => return Err(refused(why)),
        };
        let reg = self
            .key
            .check(&state, &binding, now_ms())
            .map_err(refused)?;
        let pending = self
            .ops
            .pending_key(reg)
            .await
            .map_err(|e| pending_failure(&e))?;
        if pending.expired {
            return Err(expired_link());
        }
        let (who, verified) = self.verify(&code, &state).await?;
        self.check_domain(&who, verified)?;
        let approved = self
            .ops
            .link_identity(reg, &who)
            .await
            .map_err(|e| pending_failure(&e))?;
        Ok(Linked {
            approved,
            email: who.email,
        })
    }

    /// Trades the authorization code for tokens and checks the ID token.
    async fn verify(&self, code: &str, state: &str) -> Result<(SignedIn, bool), Failure> {
        let provider_failed = |what: String| {
            Failure::new(
                502,
                "The sign-in provider did not answer as expected",
                format!(
                    "{what}. Nothing was linked: open your registration link again and sign in; \
                     if it keeps failing, tell the cluster's operator."
                ),
            )
        };
        let meta = self.provider(false).await?;
        let client = self.client(meta.clone());
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| provider_failed(format!("the provider has no token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(self.key.verifier(state)))
            .request_async(&self.http)
            .await
            .map_err(|e| {
                provider_failed(format!("trading the code for tokens failed: {}", chain(&e)))
            })?;
        let id_token = openidconnect::TokenResponse::id_token(&tokens)
            .ok_or_else(|| provider_failed("the provider sent no ID token".into()))?;
        let nonce = Nonce::new(self.key.nonce(state));
        let checked = match self.claims(&client, id_token, &nonce) {
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => {
                // The provider may have rotated its keys since they were read.
                let client = self.client(self.provider(true).await?);
                self.claims(&client, id_token, &nonce)
            }
            other => other,
        };
        match checked {
            Ok(who) => Ok(who),
            Err(e) => {
                let e = chain(&e);
                tracing::warn!(issuer = %self.cfg.issuer, "ID token refused: {e}");
                Err(Failure::new(
                    403,
                    "The sign-in could not be verified",
                    format!(
                        "The ID token from the provider was refused ({e}). Nothing was \
                         linked: open your registration link again and sign in."
                    ),
                ))
            }
        }
    }

    /// The person an ID token names, once its signature, `iss`, `aud`, `exp` and `nonce`
    /// check out; with whether the provider vouches for the email.
    fn claims(
        &self,
        client: &Client,
        id_token: &openidconnect::core::CoreIdToken,
        nonce: &Nonce,
    ) -> Result<(SignedIn, bool), ClaimsVerificationError> {
        let verifier = client.id_token_verifier().set_allowed_algs(ALGS);
        let claims = id_token.claims(&verifier, nonce)?;
        let verified = claims.email_verified() == Some(true);
        let email = match claims.email_verified() {
            Some(false) => None,
            _ => claims.email().map(|e| e.to_string()),
        };
        Ok((
            SignedIn {
                issuer: claims.issuer().to_string(),
                subject: claims.subject().to_string(),
                email,
            },
            verified,
        ))
    }

    /// Whether `who` may link keys: any one, or with `allowed_email_domains`, one whose
    /// email the provider says is `verified` and is in one of those domains.
    fn check_domain(&self, who: &SignedIn, verified: bool) -> Result<(), Failure> {
        let allowed = &self.cfg.allowed_email_domains;
        if allowed.is_empty() {
            return Ok(());
        }
        if !verified {
            return Err(Failure::new(
                403,
                "This account cannot link keys here",
                format!(
                    "{} did not say your email is verified, and this cluster only takes people \
                     from {}.",
                    self.name(),
                    allowed.join(", ")
                ),
            ));
        }
        let domain = who
            .email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        if domain.is_some_and(|d| allowed.iter().any(|a| a.eq_ignore_ascii_case(&d))) {
            return Ok(());
        }
        Err(Failure::new(
            403,
            "This account cannot link keys here",
            format!(
                "This cluster only takes people whose email is at {}; you signed in as {}. \
                 Sign in with another account, or ask the cluster's operator.",
                allowed.join(", "),
                who.email
                    .as_deref()
                    .unwrap_or("an account without an email")
            ),
        ))
    }

    fn client(&self, meta: CoreProviderMetadata) -> Client {
        CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.cfg.client_id.clone()),
            Some(ClientSecret::new(self.secret.clone())),
        )
        .set_redirect_uri(self.redirect.clone())
    }

    /// The provider's metadata and key set: cached for [`DISCOVERY_TTL`], read again when
    /// `fresh` (an unknown `kid`), at most once per [`REFRESH_GAP`].
    async fn provider(&self, fresh: bool) -> Result<CoreProviderMetadata, Failure> {
        let mut cached = self.provider.lock().await;
        if let Some((meta, at)) = cached.as_ref() {
            let age = at.elapsed();
            if age < DISCOVERY_TTL && (!fresh || age < REFRESH_GAP) {
                return Ok(meta.clone());
            }
        }
        let meta = CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| {
                tracing::warn!(issuer = %self.cfg.issuer, "OpenID discovery failed: {}", chain(&e));
                Failure::new(
                    503,
                    "The sign-in provider cannot be reached",
                    format!(
                        "{} did not answer ({}). Try again in a minute; if it keeps failing, \
                         tell the cluster's operator.",
                        self.name(),
                        chain(&e)
                    ),
                )
            })?;
        *cached = Some((meta.clone(), Instant::now()));
        Ok(meta)
    }
}

/// A client made from discovered metadata (the authorization endpoint set, the token and
/// user-info endpoints as the provider has them).
type Client = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// Signature algorithms accepted on ID tokens.
const ALGS: [CoreJwsSigningAlgorithm; 6] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn internal(e: &dyn std::fmt::Display) -> Failure {
    Failure::new(500, "Something went wrong", format!("{e}. Try again."))
}

fn expired_link() -> Failure {
    Failure::new(
        410,
        "This link has expired",
        "Registration links work for 24 hours. Connect again with ssh for a new one.",
    )
}

fn pending_failure(e: &boxd_operations::OpError) -> Failure {
    match e.kind {
        ErrorKind::NotFound => Failure::new(
            404,
            "No such registration link",
            "This link was already used, replaced by a newer one, or mistyped. Connect again \
             with ssh: a registered key gets in, an unknown one gets a new link.",
        ),
        ErrorKind::Unavailable => Failure::new(503, "Try again in a moment", e.message.clone()),
        _ => Failure::new(409, "Nothing was linked", e.message.clone()),
    }
}

fn refused(why: Refused) -> Failure {
    match why {
        Refused::BadState => Failure::new(
            400,
            "This sign-in was not started here",
            "The answer from the sign-in provider does not belong to a sign-in this browser \
             started (or it was changed on the way). Nothing was linked: open your registration \
             link and press the sign-in button there.",
        ),
        Refused::Late => Failure::new(
            400,
            "This sign-in took too long",
            "A sign-in must finish within 10 minutes of pressing the button. Nothing was \
             linked: open your registration link again and sign in.",
        ),
        Refused::NoCode => Failure::new(
            400,
            "The sign-in provider sent no code",
            "Nothing was linked: open your registration link again and sign in.",
        ),
    }
}
