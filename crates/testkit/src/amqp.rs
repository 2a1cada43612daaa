//! A raw AMQP 0-9-1 client, as small as a hostile producer can be: it
//! writes property bytes that lapin refuses to build (a `message_id` that is
//! not UTF-8, say), and reads a queue's messages without parsing them, so
//! tests can publish and inspect what our own client cannot.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The basic properties a raw publish sets, as the bytes that go on the
/// wire; `None` leaves a property out.
#[derive(Debug, Default, Clone)]
pub struct RawProperties {
    /// `content-type` (a short string).
    pub content_type: Option<Vec<u8>>,
    /// `message-id` (a short string).
    pub message_id: Option<Vec<u8>>,
}

/// A message read with `basic.get`: its content header's properties, still
/// encoded, and its body.
#[derive(Debug)]
pub struct RawMessage {
    /// The content header frame's payload after the body size.
    pub properties: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawMessage {
    /// Whether `needle` occurs in the encoded properties (header names and
    /// values such as `x-first-death-reason` and `delivery_limit`).
    pub fn properties_mention(&self, needle: &str) -> bool {
        self.properties
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }
}

struct Conn {
    stream: TcpStream,
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("a short string is at most 255 bytes"));
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).expect("fits").to_be_bytes());
    out.extend_from_slice(s);
}

impl Conn {
    /// Logs in as guest on vhost `/` and opens channel 1.
    fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Conn { stream };
        c.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        c.expect(10, 10)?; // connection.start
        let mut ok = Vec::new();
        ok.extend_from_slice(&0u32.to_be_bytes()); // no client properties
        short(&mut ok, b"PLAIN");
        long(&mut ok, b"\0guest\0guest");
        short(&mut ok, b"en_US");
        c.method(0, 10, 11, &ok)?;
        let tune = c.expect(10, 30)?;
        let mut tune_ok = tune[..6].to_vec(); // channel-max, frame-max
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        c.method(0, 10, 31, &tune_ok)?;
        let mut open = Vec::new();
        short(&mut open, b"/");
        short(&mut open, b"");
        open.push(0);
        c.method(0, 10, 40, &open)?;
        c.expect(10, 41)?;
        c.method(1, 20, 10, &[0])?;
        c.expect(20, 11)?;
        Ok(c)
    }

    fn frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        long(&mut f, payload);
        f.push(0xCE);
        self.stream.write_all(&f)
    }

    fn method(
        &mut self,
        channel: u16,
        class: u16,
        method: u16,
        args: &[u8],
    ) -> std::io::Result<()> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&method.to_be_bytes());
        p.extend_from_slice(args);
        self.frame(1, channel, &p)
    }

    /// The next frame: its type and payload.
    fn read(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head)?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload)?;
        payload.pop(); // the frame end
        Ok((head[0], payload))
    }

    /// Reads frames until the next method frame (heartbeats are skipped),
    /// which must be `class.method`; answers its arguments.
    fn expect(&mut self, class: u16, method: u16) -> std::io::Result<Vec<u8>> {
        loop {
            let (kind, p) = self.read()?;
            if kind != 1 {
                continue;
            }
            let got = (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            );
            if got != (class, method) {
                return Err(std::io::Error::other(format!(
                    "expected {class}.{method}, the broker sent {}.{}",
                    got.0, got.1
                )));
            }
            return Ok(p[4..].to_vec());
        }
    }

    fn close(mut self) -> std::io::Result<()> {
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, b"bye");
        args.extend_from_slice(&[0, 0, 0, 0]);
        self.method(0, 10, 50, &args)?;
        // The broker handles frames in order: close-ok means the publish
        // before it was routed.
        self.expect(10, 51).map(drop)
    }
}

/// Publishes `body` to `exchange` with `routing_key` and `properties`, as
/// written, on the RabbitMQ at `port` (guest, vhost `/`), and returns once
/// the broker has handled it.
pub fn publish(
    port: u16,
    exchange: &str,
    routing_key: &str,
    properties: &RawProperties,
    body: &[u8],
) -> std::io::Result<()> {
    let mut c = Conn::open(port)?;
    let mut publish = 0u16.to_be_bytes().to_vec();
    short(&mut publish, exchange.as_bytes());
    short(&mut publish, routing_key.as_bytes());
    publish.push(0);
    c.method(1, 60, 40, &publish)?;
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    let mut flags = 0u16;
    let mut values = Vec::new();
    if let Some(ct) = &properties.content_type {
        flags |= 1 << 15;
        short(&mut values, ct);
    }
    if let Some(id) = &properties.message_id {
        flags |= 1 << 7;
        short(&mut values, id);
    }
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&values);
    c.frame(2, 1, &header)?;
    if !body.is_empty() {
        c.frame(3, 1, body)?;
    }
    c.close()
}

/// Takes the next message of `queue` with `basic.get` (acknowledged on
/// receipt), or `None` when it is empty.
pub fn get(port: u16, queue: &str) -> std::io::Result<Option<RawMessage>> {
    let mut c = Conn::open(port)?;
    let mut args = 0u16.to_be_bytes().to_vec();
    short(&mut args, queue.as_bytes());
    args.push(1); // no-ack
    c.method(1, 60, 70, &args)?;
    let (kind, p) = c.read()?;
    let reply = (
        kind,
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    );
    let message = match reply {
        (1, 60, 72) => None, // get-empty
        (1, 60, 71) => {
            let (_, header) = c.read()?;
            let size = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
            let mut body = Vec::new();
            while (body.len() as u64) < size {
                body.extend(c.read()?.1);
            }
            Some(RawMessage {
                properties: header[12..].to_vec(),
                body,
            })
        }
        other => {
            return Err(std::io::Error::other(format!(
                "basic.get answered {other:?}"
            )))
        }
    };
    c.close()?;
    Ok(message)
}
