//! Counts of TLS handshakes by where they happen and, for failed ones, why: a bounded set of
//! reasons (never the peer's text), so that the metric's labels stay few.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where a handshake happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A peer router (or a site redeeming a token) connecting to this site's link access.
    LinkAccess,
    /// This router dialling a peer's link access.
    LinkDial,
    /// A client of a TLS listener.
    Listener,
    /// This router connecting to a TLS connector's backend.
    Connector,
}

impl Endpoint {
    pub const ALL: [Self; 4] = [
        Self::LinkAccess,
        Self::LinkDial,
        Self::Listener,
        Self::Connector,
    ];

    /// The metric label value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::LinkAccess => "link_access",
            Self::LinkDial => "link_dial",
            Self::Listener => "listener",
            Self::Connector => "connector",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The peer's certificate did not verify, or it sent none where one is required.
    Certificate,
    /// No protocol version, cipher suite or ALPN protocol in common.
    Incompatible,
    /// The peer sent an alert (it refused ours, most often).
    Alert,
    /// The peer broke the protocol: a malformed or unexpected message.
    Protocol,
    /// The handshake did not finish in time.
    Timeout,
    /// The connection closed or failed underneath the handshake.
    Connection,
}

impl Failure {
    pub const ALL: [Self; 6] = [
        Self::Certificate,
        Self::Incompatible,
        Self::Alert,
        Self::Protocol,
        Self::Timeout,
        Self::Connection,
    ];

    /// The metric label value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Incompatible => "incompatible",
            Self::Alert => "alert",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The reason a rustls error gives.
    #[must_use]
    pub fn of_rustls(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(_)
            | E::NoCertificatesPresented
            | E::InvalidCertRevocationList(_) => Self::Certificate,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Self::Incompatible,
            E::AlertReceived(_) => Self::Alert,
            _ => Self::Protocol,
        }
    }

    /// The outcome of a tokio-rustls handshake run under a timeout.
    pub fn of_timed<T>(
        handshake: &Result<std::io::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<(), Self> {
        match handshake {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Self::of_io(e)),
            Err(_) => Err(Self::Timeout),
        }
    }

    /// The reason an I/O error of a handshake gives: tokio-rustls carries rustls' error
    /// inside one.
    #[must_use]
    pub fn of_io(error: &std::io::Error) -> Self {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map_or(Self::Connection, Self::of_rustls)
    }
}

/// The counters; each owner of handshakes (links, forwarding) keeps its own.
#[derive(Debug, Default)]
pub struct Handshakes {
    succeeded: [AtomicU64; 4],
    failed: [[AtomicU64; 6]; 4],
}

/// One row of [`Handshakes::sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub endpoint: Endpoint,
    pub succeeded: u64,
    /// Failures by reason, in [`Failure::ALL`]'s order.
    pub failed: [u64; 6],
}

impl Handshakes {
    /// Counts one handshake's outcome.
    pub fn count(&self, endpoint: Endpoint, outcome: Result<(), Failure>) {
        let counter = match outcome {
            Ok(()) => &self.succeeded[endpoint.index()],
            Err(why) => &self.failed[endpoint.index()][why.index()],
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every endpoint's counts.
    #[must_use]
    pub fn sample(&self) -> [Sample; 4] {
        Endpoint::ALL.map(|endpoint| Sample {
            endpoint,
            succeeded: self.succeeded[endpoint.index()].load(Ordering::Relaxed),
            failed: std::array::from_fn(|i| {
                self.failed[endpoint.index()][i].load(Ordering::Relaxed)
            }),
        })
    }

    /// Two owners' counts added up.
    #[must_use]
    pub fn merged(a: [Sample; 4], b: [Sample; 4]) -> [Sample; 4] {
        std::array::from_fn(|i| Sample {
            endpoint: a[i].endpoint,
            succeeded: a[i].succeeded + b[i].succeeded,
            failed: std::array::from_fn(|r| a[i].failed[r] + b[i].failed[r]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_inside_io_errors_keep_their_reason() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(Failure::of_io(&refused), Failure::Certificate);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::of_io(&reset), Failure::Connection);
        assert_eq!(
            Failure::of_rustls(&rustls::Error::NoApplicationProtocol),
            Failure::Incompatible
        );
    }

    #[test]
    fn counts_land_under_their_endpoint_and_reason() {
        let (links, services) = (Handshakes::default(), Handshakes::default());
        links.count(Endpoint::LinkAccess, Ok(()));
        links.count(Endpoint::LinkAccess, Err(Failure::Certificate));
        services.count(Endpoint::Listener, Err(Failure::Timeout));
        let merged = Handshakes::merged(links.sample(), services.sample());
        assert_eq!(merged[0].succeeded, 1);
        assert_eq!(merged[0].failed[Failure::Certificate.index()], 1);
        assert_eq!(merged[2].failed[Failure::Timeout.index()], 1);
        assert_eq!(
            merged[1],
            Sample {
                endpoint: Endpoint::LinkDial,
                succeeded: 0,
                failed: [0; 6]
            }
        );
    }
}
