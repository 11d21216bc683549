//! Join tokens: the one string an operator hands to an agent.
//!
//! `flt1.<id>.<secret>.<ca-hash>`: `id` names the token at the hub, `secret` proves
//! possession (the hub keeps only its SHA-256), and `ca-hash` is the SHA-256 of the
//! fleet CA certificate (DER), which the agent pins before trusting the hub, as
//! kubeadm's `--discovery-token-ca-cert-hash` does.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::Error;

const PREFIX: &str = "flt1";
/// Length of the token id: enough to be unique among live tokens, short to read.
pub const ID_LEN: usize = 8;
/// Length of the secret: 32 characters of [a-z0-9] is about 165 bits.
pub const SECRET_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    /// Lowercase hex SHA-256 of the CA certificate's DER.
    pub ca_hash: String,
}

impl JoinToken {
    /// The part the agent sends to the hub: `id.secret`.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// Splits a credential (`id.secret`) as received by the hub.
    pub fn split_credential(credential: &str) -> Result<(&str, &str), Error> {
        let (id, secret) = credential
            .split_once('.')
            .ok_or_else(|| Error::Token("malformed credential".into()))?;
        check_part(id, ID_LEN, "id")?;
        check_part(secret, SECRET_LEN, "secret")?;
        Ok((id, secret))
    }
}

/// SHA-256 of a secret, hex: what the hub stores instead of the secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// SHA-256 of a certificate's DER, hex: the pin carried in a token.
pub fn ca_hash(ca_der: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_der))
}

/// The one certificate an agent may trust as its hub's CA, out of those the hub
/// served for `GetCa` (DER, in order): exactly one, whose hash is the token's pin.
/// A second certificate beside the pinned one is refused rather than ignored:
/// whoever serves it wants it trusted, and trusting it would let its holder
/// impersonate the hub (the pin would cover only the first).
pub fn pinned_ca<'a>(served: &[&'a [u8]], pin: &str) -> Result<&'a [u8], Error> {
    let [ca] = served else {
        return Err(Error::CaPin(format!(
            "the hub served {} certificates as its CA; exactly one, matching the join \
             token's pin ({pin}), is accepted",
            served.len()
        )));
    };
    let got = ca_hash(ca);
    if !got.eq_ignore_ascii_case(pin) {
        return Err(Error::CaPin(format!(
            "its certificate (sha256 {got}) does not match the hash pinned in the join \
             token ({pin})"
        )));
    }
    Ok(ca)
}

fn check_part(s: &str, len: usize, what: &str) -> Result<(), Error> {
    if s.len() != len
        || !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(Error::Token(format!(
            "{what} must be {len} characters of [a-z0-9]"
        )));
    }
    Ok(())
}

impl FromStr for JoinToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, id, secret, ca_hash] = parts[..] else {
            return Err(Error::Token("expected flt1.<id>.<secret>.<ca-hash>".into()));
        };
        if prefix != PREFIX {
            return Err(Error::Token(format!("unknown token version {prefix:?}")));
        }
        check_part(id, ID_LEN, "id")?;
        check_part(secret, SECRET_LEN, "secret")?;
        if ca_hash.len() != 64 || !ca_hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Token("CA hash must be 64 hex digits".into()));
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_hash: ca_hash.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_hash)
    }
}

impl fmt::Debug for JoinToken {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            id: "abcd1234".into(),
            secret: "0123456789abcdefghijklmnopqrstuv".into(),
            ca_hash: ca_hash(b"ca"),
        }
    }

    #[test]
    fn round_trips() {
        let t = token();
        assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
        let credential = t.credential();
        let (id, secret) = JoinToken::split_credential(&credential).unwrap();
        assert_eq!(
            (id, secret),
            ("abcd1234", "0123456789abcdefghijklmnopqrstuv")
        );
    }

    #[test]
    fn rejects_malformed() {
        let good = token().to_string();
        for bad in [
            "",
            "flt1.abc",
            &good.replace("flt1", "flt2"),
            &good[..good.len() - 1],
            &good.replace("abcd1234", "ABCD1234"),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_single_pinned_ca_is_trusted() {
        let (ca, other) = (b"the hub's CA".as_slice(), b"an attacker's CA".as_slice());
        let pin = ca_hash(ca);
        assert_eq!(pinned_ca(&[ca], &pin).unwrap(), ca);
        assert_eq!(pinned_ca(&[ca], &pin.to_uppercase()).unwrap(), ca);
        // The pinned certificate first and another after it: the pin covers only
        // one of them, so neither is trusted.
        for served in [&[ca, other][..], &[other, ca][..], &[ca, ca][..]] {
            let e = pinned_ca(served, &pin).unwrap_err().to_string();
            assert!(
                e.contains("served 2 certificates") && e.contains("exactly one"),
                "{e}"
            );
        }
        let e = pinned_ca(&[], &pin).unwrap_err().to_string();
        assert!(e.contains("served 0 certificates"), "{e}");
        let e = pinned_ca(&[other], &pin).unwrap_err().to_string();
        assert!(e.contains("does not match") && e.contains(&pin), "{e}");
    }

    #[test]
    fn debug_hides_secret() {
        assert!(!format!("{:?}", token()).contains("0123456789"));
    }
}
