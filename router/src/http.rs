//! The little HTTP/1.1 the router serves itself (metrics, the console): one request per
//! connection, a bounded request head read under a deadline, a bounded number of requests at
//! once. A crowd of slow clients is closed as it arrives rather than holding the router's
//! descriptors; nothing here is on the data path.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

/// The most a request head may take; longer ones are refused.
const MAX_HEAD: usize = 8192;

/// A request's line and the headers the router's servers look at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, without the `?` (empty when there is none).
    pub query: String,
    /// `Authorization` and `Cookie`, when sent.
    pub authorization: Option<String>,
    pub cookie: Option<String>,
}

impl Request {
    /// Parses a request head (up to the blank line); `None` when it is not HTTP/1.x.
    #[must_use]
    pub fn parse(head: &[u8]) -> Option<Self> {
        let head = std::str::from_utf8(head).ok()?;
        let mut lines = head.split("\r\n");
        let mut line = lines.next()?.split(' ');
        let (method, target, version) = (line.next()?, line.next()?, line.next()?);
        if !version.starts_with("HTTP/1.") || line.next().is_some() {
            return None;
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut request = Self {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            ..Self::default()
        };
        for line in lines.take_while(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = Some(value.trim().to_owned());
            if name.eq_ignore_ascii_case("authorization") {
                request.authorization = value;
            } else if name.eq_ignore_ascii_case("cookie") {
                request.cookie = value;
            }
        }
        Some(request)
    }

    /// The value of query parameter `name`, if present (not percent-decoded: the router's
    /// own parameters are plain tokens).
    #[must_use]
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// The value of cookie `name`, if sent.
    #[must_use]
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookie
            .as_deref()?
            .split(';')
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }
}

/// What to send back.
#[derive(Debug)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    /// More header lines, each without its line end.
    pub headers: Vec<String>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status`, of `content_type`.
    #[must_use]
    pub fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A plain-text response.
    #[must_use]
    pub fn text(status: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }
}

/// Limits of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests served at once; more are closed as they arrive.
    pub concurrent: usize,
    /// How long one request may take from accept to the last byte.
    pub deadline: Duration,
}

/// Serves `listener` until aborted, answering each request with `answer`.
pub async fn serve<F>(listener: TcpListener, limits: Limits, what: &'static str, answer: F)
where
    F: Fn(Request) -> Response + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.concurrent));
    let mut refused = crate::log_limit::LogLimit::default();
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, most likely: let the others finish first.
                debug!(server = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(conn);
            if let Some(unlogged) = refused.hit() {
                tracing::warn!(
                    server = what,
                    unlogged,
                    limit = limits.concurrent,
                    "connection refused: too many at once"
                );
            }
            continue;
        };
        let answer = Arc::clone(&answer);
        tokio::spawn(async move {
            match tokio::time::timeout(limits.deadline, exchange(conn, &*answer)).await {
                Ok(Err(e)) => debug!(server = what, error = %e, "request failed"),
                Err(_) => debug!(server = what, "request timed out"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

/// Reads one request head and writes the answer.
async fn exchange<F: Fn(Request) -> Response>(
    mut conn: TcpStream,
    answer: &F,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if head.len() >= MAX_HEAD {
            return respond(
                &mut conn,
                &Response::text("431 Request Header Fields Too Large", ""),
            )
            .await;
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let response = match Request::parse(&head[..end]) {
        Some(request) => answer(request),
        None => Response::text("400 Bad Request", "not an HTTP/1.x request\n"),
    };
    respond(&mut conn, &response).await
}

async fn respond(conn: &mut TcpStream, response: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    for header in &response.headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&response.body).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_gives_its_path_query_and_credentials() {
        let head = b"GET /api/view?token=abc&x=1 HTTP/1.1\r\nHost: h\r\nauthorization: Bearer t\r\nCookie: a=1; skiff_console=c0ffee\r\n";
        let request = Request::parse(head).expect("a request");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/api/view");
        assert_eq!(request.param("token"), Some("abc"));
        assert_eq!(request.param("y"), None);
        assert_eq!(request.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(request.cookie("skiff_console"), Some("c0ffee"));
        assert_eq!(request.cookie("b"), None);
    }

    #[test]
    fn what_is_not_http_is_refused() {
        assert_eq!(Request::parse(b"SSH-2.0-OpenSSH_9.2"), None);
        assert_eq!(Request::parse(b"GET / HTTP/2\r\n"), None);
        assert_eq!(Request::parse(b"GET / HTTP/1.1 extra\r\n"), None);
        assert_eq!(Request::parse(&[0xff, 0xfe]), None);
    }
}
