//! Certificates and keys: each site's own CA, router identities, link credentials.
//!
//! Every key is ECDSA P-256 made with rcgen over ring. A private key never leaves the site that
//! made it: link credentials are issued from a certificate signing request, and the issuer picks
//! the certificate's fields itself instead of trusting what the request asks for.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use time::{Duration, OffsetDateTime};

/// Failure to make, parse or sign a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to generate a key pair")]
    KeyGen(#[source] rcgen::Error),
    #[error("failed to parse a private key")]
    ParseKey(#[source] rcgen::Error),
    #[error("failed to parse a CA certificate")]
    ParseCa(#[source] rcgen::Error),
    #[error("failed to parse or verify a certificate signing request")]
    ParseCsr(#[source] rcgen::Error),
    #[error("failed to sign a certificate")]
    Sign(#[source] rcgen::Error),
    #[error("failed to parse PEM {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("invalid subject alternative name")]
    San(#[source] rcgen::Error),
    #[error("{what}: {problem}")]
    Invalid { what: &'static str, problem: String },
}

/// How long a site CA is valid.
pub const CA_LIFETIME: Duration = Duration::days(5 * 365);
/// How long router identities and link credentials are valid.
pub const LEAF_LIFETIME: Duration = Duration::days(365);

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a leaf certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A router identity: serves links and dials them.
    ServerAndClient,
    /// A link credential, or a workload's certificate towards a TLS listener: only dials.
    Client,
    /// A service's certificate (a TLS listener's, a backend's): only serves.
    Server,
}

fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::KeyGen)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    // Backdate a little so peers with slightly slow clocks accept a fresh certificate.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + lifetime;
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "skiff");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Makes a new self-signed site CA named after `site`.
///
/// # Errors
/// When key generation or signing fails.
pub fn new_ca(site: &str) -> Result<CertKey, Error> {
    new_named_ca(&format!("{site} site CA"))
}

/// Makes a new self-signed CA whose common name is `common_name`.
///
/// # Errors
/// When key generation or signing fails.
pub fn new_named_ca(common_name: &str) -> Result<CertKey, Error> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_LIFETIME);
    let cert = params.self_signed(&key).map_err(Error::Sign)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn leaf_params(
    common_name: &str,
    sans: &[String],
    usage: Usage,
    lifetime: Duration,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(sans.to_vec()).map_err(Error::San)?;
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match usage {
        Usage::ServerAndClient => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    Ok(params)
}

fn issuer(ca: &CertKey) -> Result<Issuer<'static, KeyPair>, Error> {
    let key = KeyPair::from_pem(&ca.key_pem).map_err(Error::ParseKey)?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(Error::ParseCa)
}

/// SHA-256 of a certificate's DER encoding, lowercase hex: how the issuing site names the
/// link credentials it signed, to revoke them.
#[must_use]
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    crate::token::hex(digest.as_ref())
}

/// Issues a leaf certificate with a new key, signed by `ca`.
///
/// `sans` are DNS names or IP addresses (rcgen tells them apart).
///
/// # Errors
/// When `ca` does not parse or a SAN is invalid.
pub fn issue(
    ca: &CertKey,
    common_name: &str,
    sans: &[String],
    usage: Usage,
) -> Result<CertKey, Error> {
    issue_for(ca, common_name, sans, usage, LEAF_LIFETIME)
}

/// [`issue`], with `uri` among the subject alternative names: the service resource the
/// certificate is for (see `tls::identity`).
///
/// # Errors
/// When `ca` does not parse or a SAN is invalid.
pub fn issue_with_uri(
    ca: &CertKey,
    common_name: &str,
    sans: &[String],
    uri: &str,
    usage: Usage,
) -> Result<CertKey, Error> {
    let key = new_key()?;
    let mut params = leaf_params(common_name, sans, usage, LEAF_LIFETIME)?;
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(uri).map_err(Error::San)?,
    ));
    let cert = params.signed_by(&key, &issuer(ca)?).map_err(Error::Sign)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// [`issue`], valid for `lifetime` from now.
///
/// # Errors
/// When `ca` does not parse or a SAN is invalid.
pub fn issue_for(
    ca: &CertKey,
    common_name: &str,
    sans: &[String],
    usage: Usage,
    lifetime: Duration,
) -> Result<CertKey, Error> {
    let key = new_key()?;
    let params = leaf_params(common_name, sans, usage, lifetime)?;
    let cert = params.signed_by(&key, &issuer(ca)?).map_err(Error::Sign)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new key and a certificate signing request for it; the key stays with the caller.
///
/// # Errors
/// When key generation or serialisation fails.
pub fn new_csr(common_name: &str) -> Result<(String, String), Error> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    let csr = params.serialize_request(&key).map_err(Error::Sign)?;
    let pem = csr.pem().map_err(Error::Sign)?;
    Ok((pem, key.serialize_pem()))
}

/// Signs a link credential (client usage only) for the key in `csr_pem`.
///
/// Only the request's public key is used (its signature is checked); the subject is
/// `common_name` and the usages are fixed here.
///
/// # Errors
/// When the request does not parse or its signature does not verify.
pub fn sign_csr(ca: &CertKey, csr_pem: &str, common_name: &str) -> Result<String, Error> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::ParseCsr)?;
    let params = leaf_params(common_name, &[], Usage::Client, LEAF_LIFETIME)?;
    let cert = params
        .signed_by(&csr.public_key, &issuer(ca)?)
        .map_err(Error::Sign)?;
    Ok(cert.pem())
}

/// Parses every certificate in a PEM text.
///
/// # Errors
/// When the text holds no certificate or a malformed one.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: "certificate",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// Parses the private key in a PEM text.
///
/// # Errors
/// When the text holds no key.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| Error::Pem {
        what: "private key",
        source,
    })
}

fn invalid(what: &'static str, problem: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        problem: problem.into(),
    }
}

/// Checks a user-supplied certificate and key: they parse, the key is the certificate's, and
/// the certificate is valid now.
fn check_pair<'a>(
    what: &'static str,
    pair: &CertKey,
    der: &'a CertificateDer<'static>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(what, format!("certificate does not parse: {e}")))?;
    let key = KeyPair::from_pem(&pair.key_pem)
        .map_err(|e| invalid(what, format!("private key does not parse: {e}")))?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(invalid(
            what,
            "the private key does not match the certificate",
        ));
    }
    let validity = cert.validity();
    if !validity.is_valid() {
        return Err(invalid(
            what,
            format!(
                "certificate is not valid now (valid from {} to {})",
                validity.not_before, validity.not_after
            ),
        ));
    }
    Ok(cert)
}

/// Validates a user-supplied site CA: parses, key matches, valid now, and is a CA.
///
/// # Errors
/// With one line that says what is wrong.
pub fn validate_ca(ca: &CertKey) -> Result<(), Error> {
    const WHAT: &str = "site CA";
    let der = certs_from_pem(&ca.cert_pem)?.remove(0);
    let cert = check_pair(WHAT, ca, &der)?;
    if !cert.is_ca() {
        return Err(invalid(
            WHAT,
            "certificate is not a CA (basicConstraints CA:TRUE missing)",
        ));
    }
    Ok(())
}

/// Validates a user-supplied router identity: parses, key matches, valid now, usable as both
/// TLS server and client, and signed by `ca_pem`.
///
/// # Errors
/// With one line that says what is wrong.
pub fn validate_router(identity: &CertKey, ca_pem: &str) -> Result<(), Error> {
    const WHAT: &str = "router certificate";
    let der = certs_from_pem(&identity.cert_pem)?.remove(0);
    let cert = check_pair(WHAT, identity, &der)?;
    if let Ok(Some(eku)) = cert.extended_key_usage()
        && !(eku.value.any || (eku.value.server_auth && eku.value.client_auth))
    {
        return Err(invalid(
            WHAT,
            "extended key usage must allow both serverAuth and clientAuth",
        ));
    }
    let ca_der = certs_from_pem(ca_pem)?.remove(0);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| invalid("site CA", format!("certificate does not parse: {e}")))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| invalid(WHAT, "it is not signed by the site CA"))?;
    Ok(())
}

/// Validates a user-supplied service certificate (a TLS listener's, or the client certificate
/// a TLS connector presents to its backend): parses, key matches, valid now, not a CA, and its
/// extended key usage (when it has one) allows `usage`.
///
/// # Errors
/// With one line that says what is wrong.
pub fn validate_service(pair: &CertKey, usage: Usage) -> Result<(), Error> {
    let what = match usage {
        Usage::Client => "client certificate",
        Usage::Server | Usage::ServerAndClient => "server certificate",
    };
    let der = certs_from_pem(&pair.cert_pem)?.remove(0);
    let cert = check_pair(what, pair, &der)?;
    if cert.is_ca() {
        return Err(invalid(what, "certificate is a CA, not a leaf"));
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let e = eku.value;
        let allowed = e.any
            || match usage {
                Usage::Client => e.client_auth,
                Usage::Server => e.server_auth,
                Usage::ServerAndClient => e.server_auth && e.client_auth,
            };
        if !allowed {
            let needed = match usage {
                Usage::Client => "clientAuth",
                Usage::Server => "serverAuth",
                Usage::ServerAndClient => "serverAuth and clientAuth",
            };
            return Err(invalid(
                what,
                format!("extended key usage does not allow {needed}"),
            ));
        }
    }
    Ok(())
}

/// Validates a user-supplied link credential: a client certificate (as
/// [`validate_service`] checks one) whose common name is `site`, signed by the peer's site CA
/// `peer_ca_pem`, which must be a CA.
///
/// # Errors
/// With one line that says what is wrong.
pub fn validate_link_credential(
    pair: &CertKey,
    peer_ca_pem: &str,
    site: &str,
) -> Result<(), Error> {
    const WHAT: &str = "link credential";
    validate_service(pair, Usage::Client)?;
    let der = certs_from_pem(&pair.cert_pem)?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| invalid(WHAT, format!("certificate does not parse: {e}")))?;
    let name = common_name(&der);
    if name.as_deref() != Some(site) {
        return Err(invalid(
            WHAT,
            format!(
                "its common name is {name:?}, but the peer takes it as this site's name, {site:?}"
            ),
        ));
    }
    let ca_der = certs_from_pem(peer_ca_pem)?.remove(0);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| invalid("peer CA", format!("certificate does not parse: {e}")))?;
    if !ca.is_ca() {
        return Err(invalid(
            "peer CA",
            "certificate is not a CA (basicConstraints CA:TRUE missing)",
        ));
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| invalid(WHAT, "it is not signed by the peer's CA"))?;
    Ok(())
}

/// When the first certificate in `pem` expires, in seconds since the Unix epoch.
#[must_use]
pub fn not_after(pem: &str) -> Option<i64> {
    let der = certs_from_pem(pem).ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The subject common name of a DER certificate, if it has one.
#[must_use]
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_is_signed_by_its_ca_and_names_its_subject() {
        let ca = new_ca("west").expect("ca");
        let leaf = issue(&ca, "west", &["127.0.0.1".into()], Usage::ServerAndClient).expect("leaf");
        let der = certs_from_pem(&leaf.cert_pem).expect("pem").remove(0);
        assert_eq!(common_name(&der).as_deref(), Some("west"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let ca_der = certs_from_pem(&ca.cert_pem).expect("pem").remove(0);
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).expect("x509");
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("leaf signature verifies with the CA key");
    }

    #[test]
    fn csr_signing_ignores_requested_subject_and_keeps_client_usage() {
        let ca = new_ca("west").expect("ca");
        let (csr, _key) = new_csr("pretends-to-be-west").expect("csr");
        let cert = sign_csr(&ca, &csr, "east").expect("signed");
        let der = certs_from_pem(&cert).expect("pem").remove(0);
        assert_eq!(common_name(&der).as_deref(), Some("east"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let eku = parsed
            .extended_key_usage()
            .expect("eku parses")
            .expect("eku present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
        assert!(!parsed.is_ca());
    }

    #[test]
    fn user_supplied_certificates_are_checked() {
        let ca = new_ca("west").expect("ca");
        validate_ca(&ca).expect("own CA is valid");
        let leaf = issue(&ca, "west", &["west".into()], Usage::ServerAndClient).expect("leaf");
        validate_router(&leaf, &ca.cert_pem).expect("router cert is valid");

        let other = new_ca("other").expect("ca");
        let mismatched = CertKey {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        let err = validate_ca(&mismatched).expect_err("wrong key");
        assert!(err.to_string().contains("does not match"), "{err}");

        let err = validate_ca(&leaf).expect_err("leaf is no CA");
        assert!(err.to_string().contains("not a CA"), "{err}");

        let err = validate_router(&leaf, &other.cert_pem).expect_err("other CA");
        assert!(
            err.to_string().contains("not signed by the site CA"),
            "{err}"
        );

        let client_only = issue(&ca, "west", &[], Usage::Client).expect("client leaf");
        let err = validate_router(&client_only, &ca.cert_pem).expect_err("client-only usage");
        assert!(err.to_string().contains("serverAuth"), "{err}");
    }

    #[test]
    fn expired_certificate_is_refused() {
        let key = new_key().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = name("old CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = OffsetDateTime::now_utc() - Duration::days(30);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        let cert = params.self_signed(&key).expect("cert");
        let old = CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let err = validate_ca(&old).expect_err("expired");
        assert!(err.to_string().contains("not valid now"), "{err}");
    }

    #[test]
    fn garbage_csr_is_rejected() {
        let ca = new_ca("west").expect("ca");
        assert!(matches!(
            sign_csr(
                &ca,
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "x"
            ),
            Err(Error::ParseCsr(_))
        ));
    }
}
