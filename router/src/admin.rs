//! The admin API: one JSON request line and one JSON response line per connection, on a Unix
//! socket in the state directory that only the owner may open (mode 0600).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use crate::{
    service::{Connector, Listener, Resources},
    token::Token,
};

/// Largest request line.
const MAX_REQUEST: u64 = 1 << 20;

/// Failure to reach or talk to the router's admin socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no router is running for {}: start it with `skiff router run`", path.display())]
    NotRunning { path: PathBuf },
    #[error("admin socket i/o failed")]
    Io(#[from] std::io::Error),
    #[error("router sent an unreadable answer")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Router(String),
    #[error(
        "the request is {0} bytes, more than the router takes ({MAX_REQUEST}): a name, file or list in it is too long"
    )]
    TooLarge(usize),
}

/// A request to the running router.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    NetworkStatus,
    TokenIssue {
        redemptions: u32,
        expiry_secs: u64,
    },
    TokenRedeem {
        token: Token,
        name: Option<String>,
        #[serde(default)]
        cost: Option<u32>,
        #[serde(default)]
        connections: Option<u32>,
    },
    /// Withdraws a grant (`grant` as the token names it): its tokens are refused from then on.
    GrantDelete {
        grant: String,
    },
    LinkStatus,
    LinkDelete {
        name: String,
    },
    /// A link from a credential obtained out of band (PEM contents, not paths).
    LinkCreate {
        name: String,
        url: String,
        peer_site: String,
        ca: String,
        cert: String,
        key: String,
        #[serde(default)]
        cost: Option<u32>,
        #[serde(default)]
        connections: Option<u32>,
    },
    ListenerCreate {
        listener: Listener,
    },
    ListenerDelete {
        name: String,
    },
    ListenerStatus,
    ConnectorCreate {
        connector: Connector,
    },
    ConnectorDelete {
        name: String,
    },
    ConnectorStatus,
    /// Creates or replaces listeners and connectors; leaves identical ones alone.
    Apply {
        resources: Resources,
    },
    /// Replaces the site policy; `None` removes it (everything allowed again).
    PolicySet {
        policy: Option<crate::policy::Policy>,
    },
    PolicyStatus,
    /// Recent flow records, those after id `since` (all kept ones without it).
    Flows {
        #[serde(default)]
        since: Option<u64>,
    },
    /// Replaces the router identity and TLS listeners' certificates, keeping links up.
    RotateCerts,
    /// Revokes the link credentials this site signed for `site` and cuts its links.
    LinkRevoke {
        site: String,
    },
    /// Makes `cgroups` (cgroup v2 directories) the directories of namespace `name`: each and
    /// its subtree belong to it from then on, and directories it had before but not now no
    /// longer do. An empty list keeps the name (listeners may refer to it) without members.
    NamespaceSet {
        name: String,
        cgroups: Vec<PathBuf>,
    },
    /// Issues a certificate bundle for a TLS listener's client or a TLS connector's backend.
    ServiceBundle {
        kind: BundleKind,
        name: String,
    },
    Shutdown,
}

/// The router's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// What serves admin requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(self: Arc<Self>, request: Request) -> impl Future<Output = Response> + Send;
}

/// Binds the admin socket at `path` (replacing a stale one) with owner-only permissions.
///
/// # Errors
/// When binding fails.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // A socket file left by a crashed router would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the task is aborted.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            if let Err(e) = serve_one(conn, handler).await {
                warn!(error = %e, "admin request failed");
            }
        });
    }
}

async fn serve_one<H: Handler>(conn: UnixStream, handler: Arc<H>) -> Result<(), Error> {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_REQUEST)
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handler.handle(request).await,
        Err(e) => Response::Error(format!("malformed admin request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Sends one request to the router whose admin socket is at `path`.
///
/// # Errors
/// When no router listens there, or it answers with an error.
pub async fn call(path: &Path, request: &Request) -> Result<serde_json::Value, Error> {
    let conn = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Error::NotRunning {
                    path: path.to_owned(),
                }
            }
            _ => Error::Io(e),
        })?;
    let (read, mut write) = conn.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // Refused here in one line, rather than as a broken pipe when the router stops reading.
    if line.len() as u64 > MAX_REQUEST {
        return Err(Error::TooLarge(line.len()));
    }
    write.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(read)
        .take(64 << 20)
        .read_line(&mut answer)
        .await?;
    match serde_json::from_str(&answer)? {
        Response::Ok(value) => Ok(value),
        Response::Error(message) => Err(Error::Router(message)),
    }
}

/// Whose bundle [`Request::ServiceBundle`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BundleKind {
    /// A workload connecting to TLS listener `name` (client certificate).
    Client,
    /// The backend of TLS connector `name` (server certificate for its host).
    Server,
}
