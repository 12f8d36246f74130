//! The read-only web console (`router run --console-addr [HOST:]PORT`): one page, embedded in
//! the binary (no CDN, nothing fetched from elsewhere), that shows this site's view of the
//! network and refreshes itself: sites and links with their state and RTT, listeners and
//! connectors, live flows, isolation denials, certificate expiry.
//!
//! It is off by default and binds loopback unless told otherwise. Every request needs the
//! console's token: a random value written to `STATE/console.token` (0600) at start, so that
//! whoever may read the admin socket's directory may read the console and nobody else. Open
//! `http://ADDR/?token=TOKEN` once; the page then keeps the token in a cookie only it can send
//! (`HttpOnly`, `SameSite=Strict`). `Authorization: Bearer TOKEN` works too.

use std::{net::SocketAddr, sync::Weak, time::Duration};

use tokio::net::TcpListener;

use crate::http::{self, Request, Response};

/// Where the console's page and its parts are served from.
const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The cookie that carries the token after the first visit.
const COOKIE: &str = "skiff_console";

/// Requests served at once, and how long one may take.
const LIMITS: http::Limits = http::Limits {
    concurrent: 16,
    deadline: Duration::from_secs(5),
};

/// What the console shows, read afresh for every refresh.
pub trait Source: Send + Sync + 'static {
    /// This site's view of the network and its services, as JSON.
    fn view(&self) -> serde_json::Value;
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --console-addr {0:?}: give PORT or HOST:PORT")]
    Address(String),
    #[error("failed to make the console's token")]
    Token,
}

/// Where `--console-addr` asks the console to listen: a bare port means loopback.
///
/// # Errors
/// When it is neither a port nor `HOST:PORT`.
pub fn address(text: &str) -> Result<String, Error> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)).to_string());
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(text.into()),
        _ => Err(Error::Address(text.into())),
    }
}

/// A new random token (32 bytes, hex).
///
/// # Errors
/// When the system's random source fails.
pub fn token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    crate::tls::random(&mut bytes).map_err(|_| Error::Token)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Serves the console on `listener` until aborted. The source is held weakly, so the console
/// does not keep a stopping router alive.
pub async fn serve<S: Source>(listener: TcpListener, token: String, source: Weak<S>) {
    http::serve(listener, LIMITS, "console", move |request| {
        answer(&request, &token, &source)
    })
    .await;
}

/// One request's answer.
fn answer<S: Source>(request: &Request, token: &str, source: &Weak<S>) -> Response {
    if request.method != "GET" {
        return Response::text("405 Method Not Allowed", "the console is read-only\n");
    }
    if request.path == "/" && request.param("token").is_some_and(|t| same(t, token)) {
        // Trade the token in the address for a cookie, and drop it from the address bar.
        let mut response = Response::text("303 See Other", "");
        response.headers = vec![
            "Location: /".to_owned(),
            format!("Set-Cookie: {COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
        ];
        return hardened(response);
    }
    let bearer = request
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "));
    let presented = request.cookie(COOKIE).or(bearer);
    if !presented.is_some_and(|t| same(t, token)) {
        return hardened(Response::text(
            "401 Unauthorized",
            "open the console as http://ADDR/?token=TOKEN; the token is in the site's state directory, console.token\n",
        ));
    }
    let response = match request.path.as_str() {
        "/" => Response::new("200 OK", "text/html; charset=utf-8", PAGE),
        "/console.js" => Response::new("200 OK", "text/javascript; charset=utf-8", SCRIPT),
        "/console.css" => Response::new("200 OK", "text/css; charset=utf-8", STYLE),
        "/api/view" => match source.upgrade() {
            Some(source) => Response::new(
                "200 OK",
                "application/json",
                serde_json::to_vec(&source.view()).unwrap_or_default(),
            ),
            None => Response::text("503 Service Unavailable", "the router is stopping\n"),
        },
        _ => Response::text("404 Not Found", "no such page\n"),
    };
    hardened(response)
}

/// Adds the headers every answer carries: nothing loads from elsewhere, nothing frames the
/// console, nothing is cached.
fn hardened(mut response: Response) -> Response {
    response.headers.extend([
        "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'".to_owned(),
        "X-Content-Type-Options: nosniff".to_owned(),
        "Referrer-Policy: no-referrer".to_owned(),
        "Cache-Control: no-store".to_owned(),
    ]);
    response
}

/// Compares a presented token with the console's in constant time.
fn same(presented: &str, token: &str) -> bool {
    presented.len() == token.len()
        && presented
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A view that does not change.
    #[derive(Debug)]
    struct Fixed(serde_json::Value);

    impl Source for Fixed {
        fn view(&self) -> serde_json::Value {
            self.0.clone()
        }
    }

    fn get(path: &str, headers: &str) -> Request {
        Request::parse(format!("GET {path} HTTP/1.1\r\n{headers}").as_bytes()).expect("request")
    }

    fn status(request: &Request) -> &'static str {
        let source = Arc::new(Fixed(serde_json::json!({"site": "west"})));
        answer(request, "t0k3n", &Arc::downgrade(&source)).status
    }

    #[test]
    fn nothing_is_served_without_the_token() {
        for path in ["/", "/api/view", "/console.js", "/?token=wrong"] {
            assert_eq!(status(&get(path, "")), "401 Unauthorized", "{path}");
        }
        assert_eq!(
            status(&get("/api/view", "Cookie: skiff_console=t0k3m\r\n")),
            "401 Unauthorized"
        );
    }

    #[test]
    fn the_token_in_the_address_becomes_a_cookie_that_opens_the_page() {
        let source = Arc::new(Fixed(serde_json::json!({"site": "west"})));
        let first = answer(&get("/?token=t0k3n", ""), "t0k3n", &Arc::downgrade(&source));
        assert_eq!(first.status, "303 See Other");
        assert!(
            first.headers.iter().any(
                |h| h.starts_with("Set-Cookie: skiff_console=t0k3n;") && h.contains("HttpOnly")
            )
        );
        let view = answer(
            &get("/api/view", "Cookie: skiff_console=t0k3n\r\n"),
            "t0k3n",
            &Arc::downgrade(&source),
        );
        assert_eq!(view.status, "200 OK");
        assert_eq!(view.body, br#"{"site":"west"}"#);
        assert_eq!(
            status(&get("/", "Authorization: Bearer t0k3n\r\n")),
            "200 OK"
        );
        assert_eq!(
            status(&get("/nowhere", "Authorization: Bearer t0k3n\r\n")),
            "404 Not Found"
        );
    }

    #[test]
    fn a_bare_port_binds_loopback() {
        assert_eq!(address("8080").expect("port"), "127.0.0.1:8080");
        assert_eq!(address("0.0.0.0:80").expect("host:port"), "0.0.0.0:80");
        assert_eq!(address("[::1]:80").expect("v6"), "[::1]:80");
        assert!(address("web").is_err());
        assert!(address(":80").is_err());
    }
}
