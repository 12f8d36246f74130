//! A peer that speaks the inter-router protocol by hand, with a real credential: for tests
//! that send what a real router never would.

use std::{sync::Arc, time::Duration};

use router::link::frame::{self, Frame};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::Site;

/// A TLS connection to a site's link-access port.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to `west`'s link-access port with TLS `config` and returns the stream, or the
/// handshake error.
pub async fn tls_to(west: &Site, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    tls_at(&west.token().await.url, config).await
}

/// Connects to the link-access port at `addr` with TLS `config`.
pub async fn tls_at(addr: &str, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("ip name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    // TLS 1.3 servers reject a client certificate after the client's handshake completes:
    // the refusal shows up on the first read.
    tls.write_all(&[]).await?;
    Ok(tls)
}

/// A link client config for `site` with a credential redeemed from one of `west`'s tokens:
/// what a peer holds after `token redeem`, for tests that speak the protocol by hand.
pub async fn credentialed(west: &Site, site: &str) -> Arc<rustls::ClientConfig> {
    let token = west.token().await;
    let (link, key) = router::link::dial::redeem(&token, site, "west")
        .await
        .expect("redeem");
    let credential = router::pki::CertKey {
        cert_pem: link.cert,
        key_pem: key,
    };
    router::tls::link_client_config(&token.ca, &credential).expect("config")
}

/// An encoded Hello.
pub fn hello(version: u16, site: &str) -> bytes::BytesMut {
    let mut bytes = bytes::BytesMut::new();
    Frame::Hello {
        version,
        site: site.into(),
    }
    .encode(&mut bytes);
    bytes
}

/// Reads frames until the first one, which must arrive within a few seconds.
pub async fn first_frame(tls: &mut Tls) -> Frame {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(frame) = frame::decode(&mut buf).expect("a valid frame") {
            return frame;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_buf(&mut buf))
            .await
            .expect("a frame in time")
            .expect("read");
        assert!(read > 0, "closed before a frame");
    }
}

/// Dials `west` as site `site` (a credential redeemed from one of its tokens) and exchanges
/// Hellos: a link connection, ready for frames.
pub async fn linked_peer(west: &Site, site: &str) -> Tls {
    let config = credentialed(west, site).await;
    let mut tls = tls_to(west, config).await.expect("handshake");
    let Frame::Hello { version, .. } = first_frame(&mut tls).await else {
        panic!("the first frame is not Hello");
    };
    tls.write_all(&hello(version, site)).await.expect("hello");
    tls
}

/// Sends one frame.
pub async fn send(tls: &mut Tls, frame: Frame) {
    let mut bytes = bytes::BytesMut::new();
    frame.encode(&mut bytes);
    tls.write_all(&bytes).await.expect("send");
}

/// Reads frames until a Pong carrying `nonce` (true), or until the connection ends or `limit`
/// passes (false).
pub async fn pong(tls: &mut Tls, nonce: u64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Ok(Some(frame)) = frame::decode(&mut buf) {
            if frame == (Frame::Pong { nonce }) {
                return true;
            }
        }
        match tokio::time::timeout_at(deadline, tls.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
}

/// The first frame of a fresh connection, or `None` when it ends first (bytes after that
/// frame are dropped: for the first frame only).
pub async fn first_frame_or_end(tls: &mut Tls) -> Option<Frame> {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Ok(Some(frame)) = frame::decode(&mut buf) {
            return Some(frame);
        }
        match tls.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Sends our Hello as site `site`.
pub async fn send_hello(tls: &mut Tls, version: u16, site: &str) {
    tls.write_all(&hello(version, site)).await.expect("hello");
}

/// Frames read from a link connection, with what has arrived of the next one kept between
/// calls.
#[derive(Default)]
pub struct Frames(bytes::BytesMut);

impl Frames {
    /// Reads frames until one `wanted` picks, within a few seconds; panics otherwise.
    pub async fn until(&mut self, tls: &mut Tls, wanted: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            while let Some(frame) = frame::decode(&mut self.0).expect("valid frames") {
                if wanted(&frame) {
                    return frame;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), tls.read_buf(&mut self.0))
                .await
                .expect("the frame in time")
                .expect("read");
            assert!(n > 0, "the connection closed before the frame");
        }
    }
}

/// Reads frames until the peer resets `stream`, and returns the reason it gave; panics when
/// the connection ends or no reset comes within a few seconds.
pub async fn reset_reason(tls: &mut Tls, stream: u32) -> String {
    reset(tls, stream).await.1
}

/// Reads frames until the peer resets `stream`, and returns the code and reason it gave;
/// panics when the connection ends or no reset comes within a few seconds.
pub async fn reset(tls: &mut Tls, stream: u32) -> (frame::ResetCode, String) {
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(frame) = frame::decode(&mut buf).expect("valid frames") {
            if let Frame::Reset {
                stream: s,
                code,
                reason,
            } = frame
                && s == stream
            {
                return (code, reason);
            }
            continue;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read_buf(&mut buf))
            .await
            .expect("a reset for the stream in time")
            .expect("read");
        assert!(n > 0, "the connection closed before the reset");
    }
}
