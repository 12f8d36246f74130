//! Service identities: a client bundle opens only the listener it was made for, and a TLS
//! connector accepts only the backend it was configured for. The service CA signs both kinds
//! (and the listeners' own certificates), so trusting the CA alone would let any of them stand
//! in for another; each certificate therefore names its resource in a URI SAN
//! (`skiff://SITE/listener/NAME`, `skiff://SITE/connector/NAME`), and the verifiers here
//! require it after the usual chain check.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

/// The identity of a client of listener `name` at `site`.
#[must_use]
pub fn listener_uri(site: &str, name: &str) -> String {
    format!("skiff://{site}/listener/{name}")
}

/// The identity of the backend of connector `name` at `site`.
#[must_use]
pub fn connector_uri(site: &str, name: &str) -> String {
    format!("skiff://{site}/connector/{name}")
}

/// Whether `cert` carries `uri` among its subject alternative names.
#[must_use]
pub fn names(cert: &CertificateDer<'_>, uri: &str) -> bool {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return false;
    };
    let Ok(Some(sans)) = parsed.subject_alternative_name() else {
        return false;
    };
    sans.value.general_names.iter().any(
        |name| matches!(name, x509_parser::extensions::GeneralName::URI(found) if *found == uri),
    )
}

fn wrong_identity(uri: &str) -> Error {
    Error::General(format!("the certificate is not for {uri}"))
}

/// A client verifier that also requires the client's certificate to name `uri`.
#[derive(Debug)]
pub struct ClientFor {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub uri: String,
}

impl ClientCertVerifier for ClientFor {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if names(end_entity, &self.uri) {
            Ok(verified)
        } else {
            Err(wrong_identity(&self.uri))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server verifier that also requires the server's certificate to name `uri`.
#[derive(Debug)]
pub struct ServerFor {
    pub inner: Arc<dyn ServerCertVerifier>,
    pub uri: String,
}

impl ServerCertVerifier for ServerFor {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if names(end_entity, &self.uri) {
            Ok(verified)
        } else {
            Err(wrong_identity(&self.uri))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn a_certificate_names_only_the_resource_it_was_made_for() {
        let ca = pki::new_ca("west").expect("ca");
        let web = listener_uri("west", "web");
        let pair =
            pki::issue_with_uri(&ca, "client", &[], &web, pki::Usage::Client).expect("issue");
        let der = pki::certs_from_pem(&pair.cert_pem).expect("pem").remove(0);
        assert!(names(&der, &web));
        assert!(!names(&der, &listener_uri("west", "api")));
        assert!(!names(&der, &connector_uri("west", "web")));
        let plain = pki::issue(&ca, "client", &[], pki::Usage::Client).expect("issue");
        let der = pki::certs_from_pem(&plain.cert_pem).expect("pem").remove(0);
        assert!(!names(&der, &web));
    }
}
