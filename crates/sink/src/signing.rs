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
//! A key belongs to one stream, so each service holds only the keys of
//! its own streams: inventory cannot sign a `RefundPayment`, nor payments a
//! `ReserveStock`. (One key per sending service would let every reader of
//! orders-center's commands sign commands to the others, with a symmetric
//! MAC.) A stream with several readers has a key per reader,
//! `stream@reader=key`: the writer holds them all and signs with each (the
//! header then holds several `v1=` items, space-separated), and each reader
//! holds its own, so no reader can write as the writer to another.
//!
//! An endorsement (`e1=`, same MAC) is a signature with another stream's
//! key: orders-center's `ReserveStock` is endorsed with the key of
//! `payment.commands`, inventory passes the command on inside its
//! `StockReserved`, and payments charges only what orders-center endorsed.
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
const ENDORSEMENT: &str = "e1=";

/// The keys of some streams, from `stream=key,stream@reader=key,...`.
#[derive(Clone, Default)]
pub struct Keyring {
    /// By name: `stream` or `stream@reader`.
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
    /// The keys of `stream`, each name (`stream`, `stream@reader`) with
    /// its keys, in a stable order.
    fn of(&self, stream: &str) -> Vec<&Vec<Vec<u8>>> {
        let mut named: Vec<(&String, &Vec<Vec<u8>>)> = self
            .keys
            .iter()
            .filter(|(name, _)| name.split('@').next() == Some(stream))
            .collect();
        named.sort_unstable_by_key(|(name, _)| *name);
        named.into_iter().map(|(_, keys)| keys).collect()
    }

    /// Whether `stream` has a key: its messages are signed and must be.
    pub fn covers(&self, stream: &str) -> bool {
        !self.of(stream).is_empty()
    }

    /// Whether any stream has a key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The signature of a message of `stream`: a `v1=` item per reader's
    /// newest key; `None` when the stream has none.
    pub fn sign(&self, stream: &str, event_id: &str, body: &[u8]) -> Option<String> {
        self.tags(VERSION, stream, event_id, body)
    }

    /// The endorsement of a message with the keys of `endorser` (another
    /// stream): `e1=` items, to append to its signature; `None` when
    /// `endorser` has no key here.
    pub fn endorse(&self, endorser: &str, event_id: &str, body: &[u8]) -> Option<String> {
        self.tags(ENDORSEMENT, endorser, event_id, body)
    }

    fn tags(&self, version: &str, stream: &str, event_id: &str, body: &[u8]) -> Option<String> {
        let tags: Vec<String> = self
            .of(stream)
            .into_iter()
            .filter_map(|keys| keys.last())
            .map(|key| {
                let tag = mac(key, stream, event_id, body).finalize().into_bytes();
                format!(
                    "{version}{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
                )
            })
            .collect();
        (!tags.is_empty()).then(|| tags.join(" "))
    }

    /// Checks a message of `stream`: any message passes on a stream
    /// without a key; on one with a key, one `v1=` item of `signature` must
    /// be one of its keys' over this message (compared in constant time).
    pub fn verify(
        &self,
        stream: &str,
        event_id: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        self.check(VERSION, stream, event_id, body, signature)
    }

    /// Checks that a message was endorsed with a key of `endorser`, as
    /// [`Keyring::verify`] checks a signature, from the `e1=` items of its
    /// signature header.
    pub fn verify_endorsement(
        &self,
        endorser: &str,
        event_id: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        self.check(ENDORSEMENT, endorser, event_id, body, signature)
    }

    fn check(
        &self,
        version: &str,
        stream: &str,
        event_id: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        let keys = self.of(stream);
        if keys.is_empty() {
            return Ok(());
        }
        let tags: Vec<Vec<u8>> = signature
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|item| item.strip_prefix(version))
            .map(|t| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .unwrap_or_default()
            })
            .collect();
        if tags.is_empty() {
            return Err(Refusal::Unsigned);
        }
        let genuine = keys.iter().flat_map(|k| k.iter()).any(|key| {
            tags.iter()
                .any(|tag| mac(key, stream, event_id, body).verify_slice(tag).is_ok())
        });
        genuine.then_some(()).ok_or(Refusal::Forged)
    }
}

/// The endorsements (`e1=` items) of a signature header, to pass on with
/// the message they endorse; `None` when it has none.
pub fn endorsements(signature: &str) -> Option<String> {
    let items: Vec<&str> = signature
        .split_whitespace()
        .filter(|item| item.starts_with(ENDORSEMENT))
        .collect();
    (!items.is_empty()).then(|| items.join(" "))
}

/// A sink that signs each message of a stream with a key before `inner`
/// delivers it; other messages pass as they are.
pub struct Signing {
    inner: std::sync::Arc<dyn crate::Sink>,
    keys: Keyring,
    /// `(stream, endorser)`: messages of `stream` are also endorsed with
    /// the keys of `endorser`.
    endorsements: Vec<(String, String)>,
}

impl Signing {
    /// Signs for `inner` with `keys`.
    pub fn new(inner: std::sync::Arc<dyn crate::Sink>, keys: Keyring) -> Self {
        Self {
            inner,
            keys,
            endorsements: Vec::new(),
        }
    }

    /// Also endorses each message of `stream` with the keys of `endorser`.
    pub fn endorsing(mut self, stream: &str, endorser: &str) -> Self {
        self.endorsements.push((stream.into(), endorser.into()));
        self
    }

    /// `message` with its signature, when its stream has a key.
    fn signed(&self, message: &crate::Message) -> Option<crate::Message> {
        let id = message.event_id.to_string();
        let stream = message.aggregate_type.as_str();
        let body = message.payload.get().as_bytes();
        let items: Vec<String> = std::iter::once(self.keys.sign(stream, &id, body))
            .chain(
                self.endorsements
                    .iter()
                    .filter(|(s, _)| s == stream)
                    .map(|(_, endorser)| self.keys.endorse(endorser, &id, body)),
            )
            .flatten()
            .collect();
        (!items.is_empty()).then(|| crate::Message {
            signature: Some(items.join(" ")),
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
    fn each_reader_of_a_stream_verifies_with_its_own_key_and_cannot_sign_for_the_other() {
        let a = "0123456789abcdef0123456789abcdef-for-saga";
        let b = "0123456789abcdef0123456789abcdef-for-payments";
        let writer: Keyring = format!("reserve@saga={a},reserve@payments={b}")
            .parse()
            .unwrap();
        let saga: Keyring = format!("reserve@saga={a}").parse().unwrap();
        let payments: Keyring = format!("reserve@payments={b}").parse().unwrap();
        let sig = writer.sign("reserve", "e", b"x").unwrap();
        assert_eq!(sig.matches("v1=").count(), 2, "{sig}");
        assert!(saga.covers("reserve") && !saga.covers("payment"));
        assert_eq!(saga.verify("reserve", "e", b"x", Some(&sig)), Ok(()));
        assert_eq!(payments.verify("reserve", "e", b"x", Some(&sig)), Ok(()));
        // What one reader can sign, the other refuses.
        let by_payments = payments.sign("reserve", "e", b"x").unwrap();
        assert_eq!(
            saga.verify("reserve", "e", b"x", Some(&by_payments)),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn an_endorsement_is_checked_with_the_endorsers_key_only() {
        let ring: Keyring = format!("reserve.commands={OLD},payment.commands={NEW}")
            .parse()
            .unwrap();
        let payments: Keyring = format!("payment.commands={NEW}").parse().unwrap();
        let inventory: Keyring = format!("reserve.commands={OLD}").parse().unwrap();
        let header = format!(
            "{} {}",
            ring.sign("reserve.commands", "e", b"x").unwrap(),
            ring.endorse("payment.commands", "e", b"x").unwrap()
        );
        assert_eq!(
            inventory.verify("reserve.commands", "e", b"x", Some(&header)),
            Ok(())
        );
        assert_eq!(
            payments.verify_endorsement("payment.commands", "e", b"x", Some(&header)),
            Ok(())
        );
        // Passed on without the signature, the endorsement still holds.
        let passed_on = endorsements(&header).unwrap();
        assert!(!passed_on.contains("v1="), "{passed_on}");
        assert_eq!(
            payments.verify_endorsement("payment.commands", "e", b"x", Some(&passed_on)),
            Ok(())
        );
        // The signature alone is no endorsement, and inventory's key makes none.
        let signed_only = ring.sign("reserve.commands", "e", b"x").unwrap();
        assert_eq!(
            payments.verify_endorsement("payment.commands", "e", b"x", Some(&signed_only)),
            Err(Refusal::Unsigned)
        );
        let by_inventory = format!(
            "e1={}",
            inventory
                .sign("reserve.commands", "e", b"x")
                .unwrap()
                .trim_start_matches("v1=")
        );
        assert_eq!(
            payments.verify_endorsement("payment.commands", "e", b"x", Some(&by_inventory)),
            Err(Refusal::Forged)
        );
        assert_eq!(
            payments.verify_endorsement("payment.commands", "e", b"y", Some(&header)),
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
