//! A russh client: connect and authenticate once, then run commands (benchmarks' load
//! generators, tests that need many connections).

use std::sync::Arc;

use anyhow::{Result, bail};

/// Accepts any host key (benches talk to servers they started).
pub struct Accept;

impl russh::client::Handler for Accept {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Key exchange and public-key auth as root.
pub async fn connect(
    addr: std::net::SocketAddr,
    key: Arc<russh::keys::PrivateKey>,
) -> Result<russh::client::Handle<Accept>> {
    // The same key exchange as the crypto floor and as Debian 12's OpenSSH client here
    // (sntrup761, its first choice, is not in russh, so it lands on curve25519-sha256).
    let cfg = Arc::new(russh::client::Config {
        preferred: russh::Preferred {
            kex: std::borrow::Cow::Borrowed(&[
                russh::kex::CURVE25519,
                russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
                russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
            ]),
            ..russh::Preferred::default()
        },
        ..Default::default()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut h = russh::client::connect_stream(cfg, tcp, Accept).await?;
    let auth = h
        .authenticate_publickey("root", russh::keys::PrivateKeyWithHashAlg::new(key, None))
        .await?;
    if !auth.success() {
        bail!("authentication refused");
    }
    Ok(h)
}

/// Runs `cmd` on a new session channel; its exit status and stdout.
pub async fn exec(h: &russh::client::Handle<Accept>, cmd: &str) -> Result<(Option<u32>, Vec<u8>)> {
    let mut ch = h.channel_open_session().await?;
    ch.exec(true, cmd).await?;
    let mut status = None;
    let mut out = Vec::new();
    while let Some(m) = ch.wait().await {
        match m {
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
            _ => {}
        }
    }
    Ok((status, out))
}
