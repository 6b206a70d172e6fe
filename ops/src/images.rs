//! Images between nodes: every node publishes the images it holds (name, build, SHA-256 of
//! the canonical archive) into the replica, serves them on its gRPC port (`Images.Fetch`,
//! peer key required), and a worker that lacks the image of a VM it must start fetches it
//! from a peer that has it, checking the hash before the image is used. So a new worker needs
//! nothing but `join`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::Replica;
use boxd_controlplane::command::Command;
use boxd_controlplane::model::{ImageAd, NodeId, is_dns_label};
use boxd_controlplane::rpc::pb;
use boxd_worker::image::{self, Archive, ImageInfo};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Size of the chunks an image travels in.
const CHUNK: usize = 256 << 10;

/// The `Images` gRPC service: this node's images, by content.
pub struct ImagesService {
    data_dir: PathBuf,
}

impl ImagesService {
    /// Serves the images under `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self { data_dir }
    }
}

type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ImageChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::images_server::Images for ImagesService {
    type FetchStream = ChunkStream;

    async fn fetch(
        &self,
        req: Request<pb::ImageRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let pb::ImageRequest { name, digest } = req.into_inner();
        if !is_dns_label(&name) {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not an image name"
            )));
        }
        let dir = image::images_dir(&self.data_dir).join(&name);
        if !dir.join("image.json").is_file() {
            return Err(Status::not_found(format!(
                "image {name} is not on this node"
            )));
        }
        let d = dir.clone();
        let archive = tokio::task::spawn_blocking(move || image::archive(&d))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        if archive.digest != digest {
            return Err(Status::failed_precondition(format!(
                "image {name} here is {} now, not {digest}: it was rebuilt; ask again",
                archive.digest
            )));
        }
        let mut child = tokio::process::Command::from(image::archive_command(&dir))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Status::internal(format!("cannot run tar: {e}")))?;
        let mut out = child
            .stdout
            .take()
            .ok_or_else(|| Status::internal("tar has no stdout"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut hash = sha2::Sha256::new();
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match read_full(&mut out, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        _ = tx.send(Err(Status::internal(format!("tar: {e}")))).await;
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                hash.update(&buf);
                if tx.send(Ok(pb::ImageChunk { data: buf })).await.is_err() {
                    return; // the fetcher went away; tar is killed with the child
                }
            }
            let ok = child.wait().await.is_ok_and(|s| s.success());
            if !ok || hex::encode(hash.finalize()) != digest {
                _ = tx
                    .send(Err(Status::data_loss(format!(
                        "image {name} changed while it was sent; ask again"
                    ))))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Reads until `buf` is full or the stream ends; the bytes read.
async fn read_full(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        let n = r.read(&mut buf[at..]).await?;
        if n == 0 {
            break;
        }
        at += n;
    }
    Ok(at)
}

/// What this node holds, as published: every built image with its archive.
fn local_ads(data_dir: &Path) -> Vec<ImageAd> {
    let Ok(list) = image::list(data_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for info in list {
        let dir = image::images_dir(data_dir).join(&info.name);
        match image::archive(&dir) {
            Ok(a) => out.push(ImageAd {
                name: info.name,
                digest: a.digest,
                bytes: a.bytes,
                built_at: a.built_at,
            }),
            Err(e) => tracing::warn!(image = %info.name, error = %e, "image not published"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Keeps this node's entry in the replica's image table true: at start and every few
/// seconds (an image built or removed with `boxd image` shows up within that).
pub async fn publish(replica: Arc<Replica>, data_dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let me = replica.id();
    loop {
        let dir = data_dir.clone();
        let here = tokio::task::spawn_blocking(move || local_ads(&dir))
            .await
            .unwrap_or_default();
        let said = replica.reader().images_of(me).await.unwrap_or_default();
        if here != said {
            let names: Vec<&str> = here.iter().map(|i| i.name.as_str()).collect();
            let names = names.join(",");
            match replica
                .write(Command::PublishImages {
                    node: me,
                    images: here,
                })
                .await
            {
                Ok(_) => tracing::info!(images = %names, "images published"),
                Err(e) => tracing::debug!(error = %e, "images not published yet"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Whether image `name` is built here.
pub fn present(data_dir: &Path, name: &str) -> bool {
    let dir = image::images_dir(data_dir).join(name);
    dir.join("image.json").is_file() && dir.join("rootfs").is_dir()
}

/// Fetches image `name` from a peer that published it (newest build first, then the next
/// peer if one fails), checks its hash, and installs it; `progress` hears each step.
pub async fn fetch(
    replica: &Replica,
    data_dir: &Path,
    name: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), String> {
    // One fetch at a time: a second VM wanting the same image finds it here afterwards.
    static FETCHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _g = FETCHING.lock().await;
    if present(data_dir, name) {
        return Ok(());
    }
    let me = replica.id();
    let sources: Vec<(NodeId, String, ImageAd)> = replica
        .reader()
        .image_sources(name.to_owned())
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(n, _, _)| *n != me)
        .collect();
    if sources.is_empty() {
        return Err(format!(
            "image {name} is on no node of the cluster: build it on one with `boxd image build {name}`"
        ));
    }
    let mut errors = Vec::new();
    for (node, addr, ad) in sources {
        progress(format!(
            "fetching image {name} from node {node} ({:.1} MiB)",
            ad.bytes as f64 / f64::from(1u32 << 20)
        ));
        match fetch_from(replica, data_dir, node, &addr, &ad, progress).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(image = %name, node, error = %e, "fetching the image failed");
                errors.push(format!("node {node}: {e}"));
            }
        }
    }
    Err(format!(
        "image {name} could not be fetched: {}",
        errors.join("; ")
    ))
}

async fn fetch_from(
    replica: &Replica,
    data_dir: &Path,
    node: NodeId,
    addr: &str,
    ad: &ImageAd,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), String> {
    let images = image::images_dir(data_dir);
    let tmp = images.join(format!(".{}.fetching", ad.name));
    _ = tokio::fs::remove_dir_all(&tmp).await;
    let rootfs = tmp.join("rootfs");
    image::public_dirs(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    let r = receive(replica, data_dir, &tmp, node, addr, ad, progress).await;
    if r.is_err() {
        _ = tokio::fs::remove_dir_all(&tmp).await;
    }
    r
}

async fn receive(
    replica: &Replica,
    data_dir: &Path,
    tmp: &Path,
    node: NodeId,
    addr: &str,
    ad: &ImageAd,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), String> {
    let mut client = replica.peers().images(addr).map_err(|e| e.to_string())?;
    let mut stream = client
        .fetch(pb::ImageRequest {
            name: ad.name.clone(),
            digest: ad.digest.clone(),
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let t0 = std::time::Instant::now();
    let mut tar = tokio::process::Command::new("tar");
    image::with_public_umask(tar.as_std_mut());
    let mut tar = tar
        .args(["-x", "--numeric-owner", "-C"])
        .arg(tmp.join("rootfs"))
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let mut stdin = tar.stdin.take().ok_or("tar has no stdin")?;
    let mut hash = sha2::Sha256::new();
    let (mut got, mut shown) = (0u64, 0u64);
    while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_owned())? {
        hash.update(&chunk.data);
        got += chunk.data.len() as u64;
        if got > ad.bytes {
            return Err(format!(
                "node {node} sent more than the {} bytes it published",
                ad.bytes
            ));
        }
        stdin
            .write_all(&chunk.data)
            .await
            .map_err(|e| format!("unpacking: tar: {e}"))?;
        let pct = got * 100 / ad.bytes.max(1);
        if pct >= shown + 10 {
            shown = pct - pct % 10;
            progress(format!(
                "fetching image {} from node {node}: {shown} %",
                ad.name
            ));
        }
    }
    drop(stdin);
    let out = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "unpacking: tar: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let digest = hex::encode(hash.finalize());
    if digest != ad.digest || got != ad.bytes {
        return Err(format!(
            "the archive failed its check: {got} bytes with SHA-256 {digest}, published {} bytes with {}",
            ad.bytes, ad.digest
        ));
    }
    let (data2, tmp2, ad2) = (data_dir.to_owned(), tmp.to_owned(), ad.clone());
    tokio::task::spawn_blocking(move || install(&data2, &tmp2, &ad2))
        .await
        .map_err(|e| e.to_string())??;
    let secs = t0.elapsed().as_secs_f64();
    progress(format!(
        "image {} fetched from node {node} and checked (SHA-256 {}): {:.1} MiB in {secs:.1} s",
        ad.name,
        &ad.digest[..12],
        ad.bytes as f64 / f64::from(1u32 << 20),
    ));
    Ok(())
}

/// Writes the fetched image's metadata (its archive too, so this node can serve it without
/// hashing it again) and renames it into place.
fn install(data_dir: &Path, tmp: &Path, ad: &ImageAd) -> Result<(), String> {
    let root = tmp.join("rootfs");
    let (files, bytes) = image::tree_size(&root).map_err(|e| e.to_string())?;
    let info = ImageInfo {
        name: ad.name.clone(),
        files,
        bytes,
        built_at: ad.built_at,
        agent: None,
        recipe: None,
    };
    let write = |file: &str, data: Vec<u8>| {
        let p = tmp.join(file);
        std::fs::write(&p, data).map_err(|e| format!("{}: {e}", p.display()))
    };
    write(
        "image.json",
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )?;
    let archive = Archive {
        built_at: ad.built_at,
        digest: ad.digest.clone(),
        bytes: ad.bytes,
    };
    write(
        "archive.json",
        serde_json::to_vec(&archive).unwrap_or_default(),
    )?;
    image::install(data_dir, &ad.name, tmp).map_err(|e| e.to_string())
}
