//! The `Boxd` service: each call takes the caller the interceptor checked, runs one operation
//! and answers with a message or a status. No operation is written here. Calls run on the
//! control plane's runtime (`lib.rs` spawns them there).

use std::future::Future;
use std::sync::Arc;

use boxd_operations::{Caller, NewToken, NewVm, OpError, Operations, Progress};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{self, status};
use crate::pb;

/// The service over the operations.
pub struct Service {
    ops: Arc<Operations>,
    /// The cluster's agent key (`Exec` authenticates to guest agents with it).
    agent_key: Arc<russh::keys::PrivateKey>,
    /// Open watches per account.
    watches: Arc<crate::watch::Open>,
}

impl Service {
    /// The service over `ops`; `agent_key` reaches guest agents.
    pub fn new(ops: Arc<Operations>, agent_key: Arc<russh::keys::PrivateKey>) -> Self {
        Self {
            ops,
            agent_key,
            watches: Arc::default(),
        }
    }

    /// Runs `f` with the operations and the caller; a refusal becomes its status.
    async fn run<T, F, Fut>(&self, caller: Caller, f: F) -> Result<T, Status>
    where
        F: FnOnce(Arc<Operations>, Caller) -> Fut,
        Fut: Future<Output = Result<T, OpError>>,
    {
        f(Arc::clone(&self.ops), caller).await.map_err(status)
    }

    fn vm(&self, v: &boxd_model::model::Vm) -> pb::Vm {
        convert::vm(&self.ops, v)
    }
}

/// The caller the interceptor put in the request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no token"))
}

fn opt<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

#[tonic::async_trait]
impl pb::boxd_server::Boxd for Service {
    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let new = NewVm {
            name: opt(r.name),
            image: opt(r.image),
            cpus: opt(r.vcpus),
            memory_mib: opt(r.memory_mib),
            disk_gib: opt(r.disk_gib),
        };
        let v = self
            .run(c, |o, c| async move {
                o.create(&c, new, &Progress::default()).await
            })
            .await?;
        Ok(Response::new(self.vm(&v)))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let c = caller(&req)?;
        let vms = self.run(c, |o, c| async move { o.list(&c).await }).await?;
        Ok(Response::new(pb::ListVmsResponse {
            vms: vms.iter().map(|v| self.vm(v)).collect(),
        }))
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let c = caller(&req)?;
        let name = req.into_inner().name;
        let v = self
            .run(c, |o, c| async move { o.find(&c, &name).await })
            .await?;
        Ok(Response::new(self.vm(&v)))
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let c = caller(&req)?;
        let name = req.into_inner().name;
        self.run(c, |o, c| async move { o.delete(&c, &name).await })
            .await?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<pb::StartVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let c = caller(&req)?;
        let name = req.into_inner().name;
        let v = self
            .run(c, |o, c| async move {
                o.start(&c, &name, &Progress::default()).await
            })
            .await?;
        Ok(Response::new(self.vm(&v)))
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let c = caller(&req)?;
        let name = req.into_inner().name;
        let v = self
            .run(c, |o, c| async move {
                o.stop(&c, &name).await?;
                o.find(&c, &name).await
            })
            .await?;
        Ok(Response::new(self.vm(&v)))
    }

    async fn restart_vm(
        &self,
        req: Request<pb::RestartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let c = caller(&req)?;
        let name = req.into_inner().name;
        let v = self
            .run(c, |o, c| async move {
                o.restart(&c, &name, &Progress::default()).await
            })
            .await?;
        Ok(Response::new(self.vm(&v)))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let c = caller(&req)?;
        let keys = self.run(c, |o, c| async move { o.keys(&c).await }).await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(convert::key).collect(),
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        // Without VMs named, a scoped caller's token keeps the caller's VMs.
        let vms = if r.vms.is_empty() {
            c.scope().vms
        } else {
            r.vms
        };
        let new = NewToken {
            ttl_ms: opt(r.ttl_seconds).map(|s| s.saturating_mul(1000)),
            vms,
            read_only: r.read_only,
            label: r.label,
        };
        let t = self
            .run(c, |o, c| async move { o.create_token(&c, new).await })
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: t.token,
            info: Some(convert::token(&t.info)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let c = caller(&req)?;
        let all = self
            .run(c, |o, c| async move { o.tokens(&c).await })
            .await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: all.iter().map(convert::token).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let c = caller(&req)?;
        let id = req.into_inner().id;
        self.run(c, |o, c| async move { o.revoke_token(&c, &id).await })
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn whoami(
        &self,
        req: Request<pb::WhoamiRequest>,
    ) -> Result<Response<pb::WhoamiResponse>, Status> {
        let c = caller(&req)?;
        let scope = c.scope();
        let token_id = match &c.credential {
            boxd_operations::Credential::Token(t) => t.id.to_string(),
            boxd_operations::Credential::Key(_) => String::new(),
        };
        let w = self
            .run(c, |o, c| async move { o.whoami(&c).await })
            .await?;
        Ok(Response::new(pb::WhoamiResponse {
            account: w.account,
            account_id: w.id.to_string(),
            token_id,
            vms: u32::try_from(w.vms).unwrap_or(u32::MAX),
            max_vms: w.max_vms,
            token_vms: scope.vms,
            read_only: scope.read_only,
        }))
    }

    type ExecStream = crate::exec::Answers;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let c = caller(&req)?;
        let key = Arc::clone(&self.agent_key);
        let answers = crate::exec::start(Arc::clone(&self.ops), key, c, req.into_inner()).await?;
        Ok(Response::new(answers))
    }

    type WatchVmsStream = ReceiverStream<Result<pb::VmEvent, Status>>;

    async fn watch_vms(
        &self,
        req: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<Self::WatchVmsStream>, Status> {
        let c = caller(&req)?;
        let slot = self.watches.take(c.account)?;
        let (tx, rx) = tokio::sync::mpsc::channel(crate::watch::BUFFER);
        let ops = Arc::clone(&self.ops);
        tokio::spawn(async move {
            crate::watch::run(ops, c, tx).await;
            drop(slot);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
