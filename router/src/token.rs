//! Access grants and tokens.
//!
//! The issuing site records a grant (redemptions left, expiry, secret code) and writes a token
//! holding the grant's address, id and code and the issuer's CA certificate. The redeeming
//! site connects to that address over TLS (ALPN `skiff-grant/1`), verifying the issuer's CA,
//! and sends the grant id, the code and a certificate signing request; the issuer answers with a
//! link credential signed by its CA. The private key never leaves the redeeming site.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Default number of redemptions a grant allows.
pub const DEFAULT_REDEMPTIONS: u32 = 1;
/// Default lifetime of a grant.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// Failed redemptions from one source address allowed per [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Sources whose failures are remembered at once.
const MAX_SOURCES: usize = 4096;

/// Why a redemption was refused. The messages go back to the redeeming site verbatim.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    #[error("the token is unknown to the issuing site (deleted, or from another site)")]
    UnknownGrant,
    #[error("the token has expired; issue a new one")]
    Expired,
    #[error("the token has already been redeemed; issue a new one")]
    UsedUp,
    #[error("the token's code is wrong")]
    WrongCode,
    #[error("too many failed redemptions from this address; wait a minute")]
    RateLimited,
}

/// The longest a grant may stay redeemable: tokens are meant to be short-lived.
pub const MAX_EXPIRY: Duration = Duration::from_secs(365 * 86_400);

/// The most redemptions one grant may allow.
pub const MAX_REDEMPTIONS: u32 = 1_000;

/// Why a grant could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("a token must allow at least one redemption and at most {MAX_REDEMPTIONS}, not {0}")]
    Redemptions(u32),
    #[error("a token must stay valid for at least 1s and at most 365d, not {0}s")]
    Expiry(u64),
}

/// One access grant, as the issuer stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Grant {
    pub code: String,
    pub redemptions_left: u32,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Grant {
    /// A grant for `redemptions` redemptions within `expiry_secs` from now.
    ///
    /// # Errors
    /// When either is zero or above its limit ([`MAX_REDEMPTIONS`], [`MAX_EXPIRY`]).
    pub fn new(code: String, redemptions: u32, expiry_secs: u64) -> Result<Self, GrantError> {
        if !(1..=MAX_REDEMPTIONS).contains(&redemptions) {
            return Err(GrantError::Redemptions(redemptions));
        }
        if !(1..=MAX_EXPIRY.as_secs()).contains(&expiry_secs) {
            return Err(GrantError::Expiry(expiry_secs));
        }
        Ok(Self {
            code,
            redemptions_left: redemptions,
            expires_at: now_secs().saturating_add(expiry_secs),
        })
    }
}

/// The token file (and the spec of an `AccessToken`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Token {
    /// `HOST:PORT` of the issuer's link-access endpoint.
    pub url: String,
    /// The grant's id at the issuing site.
    pub grant: String,
    /// The grant's secret code.
    pub code: String,
    /// The issuing site's name.
    pub site: String,
    /// The issuing site's CA certificate (PEM): the redeemer trusts nothing else.
    pub ca: String,
}

/// What the redeeming site sends, as one JSON line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemRequest {
    pub grant: String,
    pub code: String,
    pub site: String,
    pub csr: String,
}

/// What the issuer answers, as one JSON line: the credential, or `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum RedeemResponse {
    Ok {
        certificate: String,
        ca: String,
        site: String,
    },
    Error {
        error: String,
    },
}

impl RedeemResponse {
    /// A refusal with a one-line reason.
    #[must_use]
    pub fn error(reason: impl Into<String>) -> Self {
        Self::Error {
            error: reason.into(),
        }
    }
}

/// The grants a site issued, and the failed-attempt counters that rate-limit redemption.
#[derive(Debug, Default)]
pub struct Grants {
    grants: BTreeMap<String, Grant>,
    failures: HashMap<Source, (u32, Instant)>,
}

/// Where failed redemptions are counted: an IPv4 address, or an IPv6 /64 (one host's share
/// of IPv6 space, so one host cannot pick a fresh address per guess).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => Self::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

/// The link credentials this site signed, by certificate fingerprint, and which are revoked:
/// `STATE/credentials.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Credentials(BTreeMap<String, Credential>);

/// One signed link credential.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    pub site: String,
    pub issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

impl Credentials {
    /// Records a credential signed for `site`.
    pub fn issued(&mut self, fingerprint: String, site: &str) {
        self.0.insert(
            fingerprint,
            Credential {
                site: site.to_owned(),
                issued_at: now_secs(),
                revoked_at: None,
            },
        );
    }

    /// Forgets a credential recorded by [`Self::issued`] that was never handed out.
    pub fn forget(&mut self, fingerprint: &str) {
        self.0.remove(fingerprint);
    }

    /// Revokes every credential signed for `site`; returns how many were still valid.
    pub fn revoke(&mut self, site: &str) -> usize {
        let now = now_secs();
        self.0
            .values_mut()
            .filter(|c| c.site == site && c.revoked_at.is_none())
            .map(|c| c.revoked_at = Some(now))
            .count()
    }

    /// Whether a credential signed for `site` is still valid (not revoked).
    #[must_use]
    pub fn holds(&self, site: &str) -> bool {
        self.0
            .values()
            .any(|c| c.site == site && c.revoked_at.is_none())
    }

    /// Whether the credential with this fingerprint was revoked.
    #[must_use]
    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.0
            .get(fingerprint)
            .is_some_and(|c| c.revoked_at.is_some())
    }
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Grants {
    /// Grants as loaded from the state directory.
    #[must_use]
    pub fn new(grants: BTreeMap<String, Grant>) -> Self {
        Self {
            grants,
            failures: HashMap::new(),
        }
    }

    /// The grants to persist (expired and used-up ones are dropped).
    #[must_use]
    pub fn to_store(&self) -> BTreeMap<String, Grant> {
        let now = now_secs();
        self.grants
            .iter()
            .filter(|(_, g)| g.redemptions_left > 0 && g.expires_at > now)
            .map(|(id, g)| (id.clone(), g.clone()))
            .collect()
    }

    /// Records a new grant under `id`.
    pub fn insert(&mut self, id: String, grant: Grant) {
        self.grants.insert(id, grant);
    }

    /// Forgets the grant `id` (one that could not be stored, or withdrawn); whether it was here.
    pub fn remove(&mut self, id: &str) -> bool {
        self.grants.remove(id).is_some()
    }

    /// Checks a redemption attempt from `source` without using a redemption: the caller
    /// signs the credential, then [`Self::spend`]s, so a request refused after this (a bad
    /// certificate signing request, a name taken meanwhile) costs the grant nothing.
    ///
    /// # Errors
    /// When the grant is unknown, expired, used up, the code is wrong, or `source` failed too
    /// often in the last minute.
    pub fn authorize(
        &mut self,
        source: IpAddr,
        grant_id: &str,
        code: &str,
    ) -> Result<(), RedeemError> {
        let now = Instant::now();
        let source = Source::of(source);
        if let Some((count, since)) = self.failures.get(&source)
            && *count >= MAX_FAILURES
            && now.duration_since(*since) < FAILURE_WINDOW
        {
            return Err(RedeemError::RateLimited);
        }
        let result = self.check(grant_id, code);
        if result.is_err() {
            self.failed(source, now);
        }
        result
    }

    /// Uses one redemption of a grant [`Self::authorize`] accepted; refused when another
    /// redemption took the last one meanwhile, or it expired.
    ///
    /// # Errors
    /// When the grant is gone, expired or used up.
    pub fn spend(&mut self, grant_id: &str) -> Result<(), RedeemError> {
        let grant = self
            .grants
            .get_mut(grant_id)
            .ok_or(RedeemError::UnknownGrant)?;
        if grant.expires_at <= now_secs() {
            return Err(RedeemError::Expired);
        }
        grant.redemptions_left = grant
            .redemptions_left
            .checked_sub(1)
            .ok_or(RedeemError::UsedUp)?;
        Ok(())
    }

    /// Gives back a redemption [`Self::spend`] used, when what it paid for could not be kept.
    pub fn refund(&mut self, grant_id: &str) {
        if let Some(grant) = self.grants.get_mut(grant_id) {
            grant.redemptions_left = grant.redemptions_left.saturating_add(1);
        }
    }

    /// Redemptions left on a grant (none for an unknown one).
    #[must_use]
    pub fn left(&self, grant_id: &str) -> u32 {
        self.grants.get(grant_id).map_or(0, |g| g.redemptions_left)
    }

    /// Counts a failure from `source`. The table is bounded: past [`MAX_SOURCES`] entries,
    /// those whose window ended go first, then the oldest.
    fn failed(&mut self, source: Source, now: Instant) {
        if self.failures.len() >= MAX_SOURCES && !self.failures.contains_key(&source) {
            self.failures
                .retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
            if self.failures.len() >= MAX_SOURCES
                && let Some(oldest) = self
                    .failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| *k)
            {
                self.failures.remove(&oldest);
            }
        }
        let entry = self.failures.entry(source).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    fn check(&self, grant_id: &str, code: &str) -> Result<(), RedeemError> {
        let grant = self.grants.get(grant_id).ok_or(RedeemError::UnknownGrant)?;
        if !constant_time_eq(grant.code.as_bytes(), code.as_bytes()) {
            return Err(RedeemError::WrongCode);
        }
        if grant.expires_at <= now_secs() {
            return Err(RedeemError::Expired);
        }
        if grant.redemptions_left == 0 {
            return Err(RedeemError::UsedUp);
        }
        Ok(())
    }
}

/// Compares secrets without an early exit that would leak how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lowercase hex of `bytes`: grant ids and codes.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses durations like `15m`, `2h`, `30s`, `1d`.
///
/// # Errors
/// When the text is not a number followed by s, m, h or d.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 15m, 2h, 1d"))?;
    let unit_secs: u64 = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}: use s, m, h or d"
            ));
        }
    };
    let secs = n
        .checked_mul(unit_secs)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(redemptions: u32, expires_in: i64) -> Grants {
        let mut g = Grants::default();
        g.insert(
            "g1".into(),
            Grant {
                code: "secret".into(),
                redemptions_left: redemptions,
                expires_at: now_secs().saturating_add_signed(expires_in),
            },
        );
        g
    }

    const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The review's lifetimes: zero redemptions, zero seconds, and 2^64-1 seconds (which
    /// overflowed the expiry time) are refused in one line; the limits themselves are fine.
    #[test]
    fn grants_with_no_life_or_endless_life_are_refused() {
        let grant = |r, e| Grant::new("c".into(), r, e);
        assert_eq!(grant(0, 60), Err(GrantError::Redemptions(0)));
        assert_eq!(grant(1, 0), Err(GrantError::Expiry(0)));
        assert_eq!(grant(1, u64::MAX), Err(GrantError::Expiry(u64::MAX)));
        assert_eq!(
            grant(MAX_REDEMPTIONS + 1, 60),
            Err(GrantError::Redemptions(MAX_REDEMPTIONS + 1))
        );
        let longest = grant(MAX_REDEMPTIONS, MAX_EXPIRY.as_secs()).expect("at the limits");
        assert!(longest.expires_at > now_secs());
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert!(parse_duration("18446744073709551615d").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn single_use_grant_redeems_once() {
        let mut g = grants(1, 60);
        assert_eq!(g.authorize(SRC, "g1", "secret"), Ok(()));
        assert_eq!(g.left("g1"), 1, "authorizing spends nothing");
        assert_eq!(g.spend("g1"), Ok(()));
        assert_eq!(g.authorize(SRC, "g1", "secret"), Err(RedeemError::UsedUp));
        assert_eq!(g.spend("g1"), Err(RedeemError::UsedUp));
        g.refund("g1");
        assert_eq!(g.left("g1"), 1, "a refund gives the redemption back");
        assert_eq!(g.spend("g1"), Ok(()));
        assert!(g.to_store().is_empty(), "used-up grants are not persisted");
    }

    #[test]
    fn expired_wrong_code_and_unknown_are_refused() {
        assert_eq!(
            grants(1, -1).authorize(SRC, "g1", "secret"),
            Err(RedeemError::Expired)
        );
        assert_eq!(
            grants(1, 60).authorize(SRC, "g1", "guess"),
            Err(RedeemError::WrongCode)
        );
        assert_eq!(
            grants(1, 60).authorize(SRC, "nope", "secret"),
            Err(RedeemError::UnknownGrant)
        );
    }

    #[test]
    fn repeated_failures_are_rate_limited_even_with_the_right_code() {
        let mut g = grants(1, 60);
        for _ in 0..MAX_FAILURES {
            assert_eq!(g.authorize(SRC, "g1", "guess"), Err(RedeemError::WrongCode));
        }
        assert_eq!(
            g.authorize(SRC, "g1", "secret"),
            Err(RedeemError::RateLimited)
        );
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        assert_eq!(
            g.authorize(other, "g1", "secret"),
            Ok(()),
            "other sources are unaffected"
        );
    }

    /// One IPv6 host picking a new address per guess is still one source; a flood of sources
    /// leaves the table at its bound and still limits the newest.
    #[test]
    fn failure_counts_are_per_host_and_bounded() {
        let mut g = grants(1, 60);
        for i in 0..MAX_FAILURES {
            let ip: IpAddr = format!("2001:db8::{:x}", i + 1).parse().expect("ip");
            assert_eq!(g.authorize(ip, "g1", "guess"), Err(RedeemError::WrongCode));
        }
        let fresh: IpAddr = "2001:db8::ffff".parse().expect("ip");
        assert_eq!(
            g.authorize(fresh, "g1", "secret"),
            Err(RedeemError::RateLimited)
        );
        for i in 0..(MAX_SOURCES as u32 * 2) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = g.authorize(ip, "g1", "guess");
        }
        assert!(g.failures.len() <= MAX_SOURCES, "{}", g.failures.len());
        let last = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000));
        for _ in 0..MAX_FAILURES {
            let _ = g.authorize(last, "g1", "guess");
        }
        assert_eq!(
            g.authorize(last, "g1", "secret"),
            Err(RedeemError::RateLimited)
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
