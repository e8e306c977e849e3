//! CONNECT tunnels: who may open one, to which ports, and never to
//! Cistern itself.

use crate::body::ClientBody;
use http::uri::Authority;
use http::{Request, Response, StatusCode};

use super::answers::forbidden;
use super::{Answer, ConnInfo, Proxy};
use crate::body;
use crate::config::CacheMode;
use crate::observe::CacheOutcome;
use crate::snapshot::Snapshot;
use crate::tunnel;

impl Proxy {
    /// A CONNECT: checks the ACL, the port and the mode, then splices the
    /// client's upgraded connection to the target.
    pub(super) async fn connect(
        &self,
        req: Request<ClientBody>,
        authority: Authority,
        conn: ConnInfo,
        snap: &Snapshot,
    ) -> Answer {
        if !snap.router.forward_allowed(conn.client.ip()) {
            return Answer::local(forbidden());
        }
        let port = authority.port_u16().unwrap_or(0);
        if !snap.router.connect_port_allowed(port) {
            return Answer::local(body::text(
                StatusCode::FORBIDDEN,
                format!("CONNECT to port {port} is not allowed"),
            ));
        }
        if snap.config.mode == CacheMode::Offline {
            return Answer::local(body::text(
                StatusCode::GATEWAY_TIMEOUT,
                "offline mode: no tunnels",
            ));
        }
        let own = self.engine.own_sockets();
        match tunnel::connect(own, &authority, snap.config.timeouts.connect).await {
            Ok(upstream) => {
                let mut req = req;
                tunnel::splice(
                    &mut req,
                    upstream,
                    authority.to_string(),
                    snap.config.timeouts.idle,
                );
                Answer {
                    response: Response::new(body::empty()),
                    outcome: CacheOutcome::Tunnel,
                }
            }
            Err(e) => match crate::ours::self_target_in(&e) {
                Some(refused) => {
                    Answer::local(body::text(StatusCode::LOOP_DETECTED, refused.to_string()))
                }
                None => Answer::local(body::text(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot reach {authority}: {e}"),
                )),
            },
        }
    }
}
