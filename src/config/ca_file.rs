//! `conveyour.ca_file`: extra root certificates the connector trusts for
//! ConveYour, read and checked when the config is loaded, so a bad file
//! stops the connector before anything connects.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{self, SectionKind};
use rustls::pki_types::CertificateDer;

/// The certificates of a `conveyour.ca_file`: each one parsed and accepted
/// as a trust anchor, at least one. Its `Debug` shows the path and the
/// count, not the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    path: PathBuf,
    /// DER, in file order.
    certificates: Vec<Vec<u8>>,
}

impl CaFile {
    /// Reads the PEM file at `path`. The error says what is wrong with the
    /// file and what to give instead; the caller names the key.
    pub(crate) fn read(path: &Path) -> Result<CaFile, String> {
        let shown = path.display();
        let text = std::fs::read(path).map_err(|e| {
            format!("cannot read {shown} ({e}); give the path of a PEM file of CA certificates that the connector's user can read")
        })?;
        if !text.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(format!(
                "{shown} is not a PEM file (no -----BEGIN CERTIFICATE----- line); convert a DER certificate with `openssl x509 -inform der -in FILE -out ca.pem`"
            ));
        }
        let mut reader: &[u8] = &text;
        let mut certificates = Vec::new();
        let mut other = Vec::new();
        loop {
            match pem::from_buf(&mut reader as &mut dyn BufRead) {
                Ok(None) => break,
                Ok(Some((SectionKind::Certificate, der))) => certificates.push(der),
                Ok(Some((kind, _))) => other.push(format!("{kind:?}")),
                Err(e) => {
                    return Err(format!(
                        "{shown} is not valid PEM ({e}); give the CA certificates as PEM, each between -----BEGIN CERTIFICATE----- and -----END CERTIFICATE-----"
                    ))
                }
            }
        }
        if certificates.is_empty() {
            let found = if other.is_empty() {
                String::new()
            } else {
                format!(" (only {})", other.join(", "))
            };
            return Err(format!(
                "{shown} holds no certificate{found}; give the CA's certificate (-----BEGIN CERTIFICATE-----), not its key"
            ));
        }
        // The same check the HTTP client makes when it adds a root, so a
        // file accepted here is never refused later.
        let mut roots = rustls::RootCertStore::empty();
        for (i, der) in certificates.iter().enumerate() {
            roots
                .add(CertificateDer::from(der.as_slice()))
                .map_err(|e| {
                    format!(
                        "{shown}: certificate {} of {} is not a usable X.509 certificate ({e}); give the CA certificate as issued",
                        i + 1,
                        certificates.len()
                    )
                })?;
        }
        Ok(CaFile {
            path: path.to_owned(),
            certificates,
        })
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Each certificate, DER-encoded, in file order (never empty).
    pub fn certificates(&self) -> impl Iterator<Item = &[u8]> {
        self.certificates.iter().map(Vec::as_slice)
    }
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFile")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}
