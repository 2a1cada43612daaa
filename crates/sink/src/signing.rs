//! Signed messages between the services. Whoever can publish to a broker
//! can otherwise write any saga message: a `PaymentSucceeded` for an unpaid
//! order, a `RefundPayment` for a completed one.
//!
//! Each stream (aggregate type) with a key carries, in its `signature`
//! header, an HMAC-SHA256 over the stream, the event id and the body:
//!
//! ```text
//! v1=<base64url(HMAC-SHA256(key, "orders-center/v1\n" + stream + "\n" + event id + "\n" + body))>
//! ```
//!
//! A key belongs to one stream, and every saga stream has one writer and
//! one reader (`reserve.commands`: orders-center to inventory; `reserve`:
//! inventory to orders-center; ...), so each service holds only the keys of
//! its own streams: inventory cannot sign a `ChargePayment`, nor payments a
//! `StockReserved`. (One key per sending service would let every reader of
//! orders-center's commands sign commands to the others, with a symmetric
//! MAC.)
//!
//! Rotation: a stream may have several keys (`stream=old|new`, or the
//! stream named twice). The last one signs; any of them verifies. Add the
//! new key last on the reader, then on the writer, then drop the old one.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries a signature.
pub const HEADER: &str = "signature";

/// The shortest key accepted: 32 bytes, as many as the MAC's output.
pub const MIN_KEY_LEN: usize = 32;

const VERSION: &str = "v1=";

/// The keys of some streams, from `stream=key,stream=key,...`.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: HashMap<String, Vec<Vec<u8>>>,
}

impl fmt::Debug for Keyring {
    /// The streams only: keys are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut streams: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        streams.sort_unstable();
        f.debug_struct("Keyring")
            .field("streams", &streams)
            .finish()
    }
}

impl FromStr for Keyring {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut ring = Keyring::default();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (stream, key) = pair
                .split_once('=')
                .ok_or("a saga key is stream=key, e.g. reserve.commands=<32 bytes or more>")?;
            let stream = stream.trim();
            for key in key.split('|').map(str::trim) {
                if key.len() < MIN_KEY_LEN {
                    return Err(format!(
                        "a key of {stream} is {} bytes; at least {MIN_KEY_LEN}",
                        key.len()
                    ));
                }
                ring.keys
                    .entry(stream.to_owned())
                    .or_default()
                    .push(key.as_bytes().to_vec());
            }
        }
        Ok(ring)
    }
}

/// What is wrong with a message's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The stream has a key and the message no signature.
    Unsigned,
    /// The signature is not one of the stream's keys for this message.
    Forged,
}

impl Keyring {
    /// Whether `stream` has a key: its messages are signed and must be.
    pub fn covers(&self, stream: &str) -> bool {
        self.keys.contains_key(stream)
    }

    /// The streams with keys.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The signature of a message of `stream`, with its newest key; `None`
    /// when the stream has none.
    pub fn sign(&self, stream: &str, event_id: &str, body: &[u8]) -> Option<String> {
        let key = self.keys.get(stream)?.last()?;
        let tag = mac(key, stream, event_id, body).finalize().into_bytes();
        Some(format!(
            "{VERSION}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        ))
    }

    /// Checks a message of `stream`: any message passes on a stream
    /// without a key; on one with a key, `signature` must be one of its
    /// keys' over this message (compared in constant time).
    pub fn verify(
        &self,
        stream: &str,
        event_id: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        let Some(keys) = self.keys.get(stream) else {
            return Ok(());
        };
        let signature = signature.ok_or(Refusal::Unsigned)?;
        let tag = signature
            .strip_prefix(VERSION)
            .and_then(|t| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
            })
            .ok_or(Refusal::Forged)?;
        keys.iter()
            .any(|key| mac(key, stream, event_id, body).verify_slice(&tag).is_ok())
            .then_some(())
            .ok_or(Refusal::Forged)
    }
}

/// A sink that signs each message of a stream with a key before `inner`
/// delivers it; other messages pass as they are.
pub struct Signing {
    inner: std::sync::Arc<dyn crate::Sink>,
    keys: Keyring,
}

impl Signing {
    /// Signs for `inner` with `keys`.
    pub fn new(inner: std::sync::Arc<dyn crate::Sink>, keys: Keyring) -> Self {
        Self { inner, keys }
    }
}

impl Signing {
    /// `message` with its signature, when its stream has a key.
    fn signed(&self, message: &crate::Message) -> Option<crate::Message> {
        let id = message.event_id.to_string();
        let signature = self.keys.sign(
            &message.aggregate_type,
            &id,
            message.payload.get().as_bytes(),
        )?;
        Some(crate::Message {
            signature: Some(signature),
            ..message.clone()
        })
    }
}

#[async_trait::async_trait]
impl crate::Sink for Signing {
    async fn deliver(&self, message: &crate::Message) -> crate::Outcome {
        match self.signed(message) {
            Some(signed) => self.inner.deliver(&signed).await,
            None => self.inner.deliver(message).await,
        }
    }

    async fn deliver_batch(&self, messages: &[crate::Message]) -> Vec<crate::Outcome> {
        let signed: Vec<_> = messages
            .iter()
            .map(|m| self.signed(m).unwrap_or_else(|| m.clone()))
            .collect();
        self.inner.deliver_batch(&signed).await
    }

    async fn deliver_run(
        &self,
        partition: i16,
        messages: &[crate::Message],
    ) -> Vec<crate::Outcome> {
        let signed: Vec<_> = messages
            .iter()
            .map(|m| self.signed(m).unwrap_or_else(|| m.clone()))
            .collect();
        self.inner.deliver_run(partition, &signed).await
    }
}

fn mac(key: &[u8], stream: &str, event_id: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for part in [
        b"orders-center/v1\n",
        stream.as_bytes(),
        b"\n",
        event_id.as_bytes(),
        b"\n",
    ] {
        mac.update(part);
    }
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "0123456789abcdef0123456789abcdef-old";
    const NEW: &str = "0123456789abcdef0123456789abcdef-new";

    #[test]
    fn a_signature_holds_for_its_stream_id_and_body_only() {
        let ring: Keyring = format!("payment={NEW}").parse().unwrap();
        let sig = ring.sign("payment", "e-1", b"{}").unwrap();
        assert!(sig.starts_with("v1="));
        assert_eq!(ring.verify("payment", "e-1", b"{}", Some(&sig)), Ok(()));
        for (stream, id, body) in [("payment", "e-2", &b"{}"[..]), ("payment", "e-1", b"{ }")] {
            assert_eq!(
                ring.verify(stream, id, body, Some(&sig)),
                Err(Refusal::Forged),
                "{stream} {id}"
            );
        }
        let other: Keyring = format!("reserve={NEW}").parse().unwrap();
        let theirs = other.sign("reserve", "e-1", b"{}").unwrap();
        assert_eq!(
            ring.verify("payment", "e-1", b"{}", Some(&theirs)),
            Err(Refusal::Forged),
            "another stream's signature"
        );
        assert_eq!(
            ring.verify("payment", "e-1", b"{}", None),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            ring.verify("payment", "e-1", b"{}", Some("v1=not base64!")),
            Err(Refusal::Forged)
        );
        assert_eq!(
            ring.verify("saga", "e-1", b"{}", None),
            Ok(()),
            "no key, no check"
        );
    }

    #[test]
    fn the_newest_key_signs_and_every_key_verifies_while_rotating() {
        let old: Keyring = format!("payment={OLD}").parse().unwrap();
        let both: Keyring = format!("payment={OLD}, payment={NEW}").parse().unwrap();
        let piped: Keyring = format!("payment={OLD}|{NEW}").parse().unwrap();
        assert_eq!(
            piped.sign("payment", "e", b"x"),
            both.sign("payment", "e", b"x")
        );
        let new: Keyring = format!("payment={NEW}").parse().unwrap();
        let by_old = old.sign("payment", "e", b"x").unwrap();
        let by_both = both.sign("payment", "e", b"x").unwrap();
        assert_eq!(by_both, new.sign("payment", "e", b"x").unwrap());
        assert_eq!(both.verify("payment", "e", b"x", Some(&by_old)), Ok(()));
        assert_eq!(
            new.verify("payment", "e", b"x", Some(&by_old)),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn short_keys_and_malformed_pairs_are_refused_and_keys_never_printed() {
        assert!("payment=short".parse::<Keyring>().is_err());
        assert!("payment".parse::<Keyring>().is_err());
        let ring: Keyring = format!("payment={NEW}").parse().unwrap();
        assert!(!format!("{ring:?}").contains(NEW));
        assert!(format!("{ring:?}").contains("payment"));
    }
}
