//! TCP proxies for the end-to-end tests: one records what a participant sends (the egress
//! test's instrument, with the searches run over the recording), one breaks a connection
//! mid-transfer (the resumable download and upload tests).
//!
//! The participant is pointed at the proxy instead of the aggregator; the proxy forwards
//! both directions unchanged and keeps every byte the participant sends, one buffer per
//! connection. The connection is plaintext HTTP/2 (the federation runs without TLS for this
//! test, so that what is inspected is exactly what TLS would encrypt), and
//! [`http2_payloads`] reassembles each stream's DATA frames, so a value split across two
//! frames is still found.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every byte sent through the proxy towards the aggregator, one buffer per connection, in
/// the order the connections were accepted.
#[derive(Default, Clone)]
pub struct Captured(Arc<Mutex<Vec<Vec<u8>>>>);

impl Captured {
    /// A copy of what each connection carried so far.
    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.0.lock().expect("capture lock").clone()
    }

    /// Bytes recorded over all connections.
    pub fn total_bytes(&self) -> usize {
        self.0
            .lock()
            .expect("capture lock")
            .iter()
            .map(Vec::len)
            .sum()
    }
}

/// A proxy on a free loopback port that forwards to `upstream` and records the client's
/// side of every connection. Returns its `http://` URL.
pub async fn recording_proxy(upstream: SocketAddr) -> (String, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("proxy address"));
    let captured = Captured::default();
    let record = captured.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let slot = {
                let mut all = record.0.lock().expect("capture lock");
                all.push(Vec::new());
                all.len() - 1
            };
            let record = record.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.0.lock().expect("capture lock")[slot].extend_from_slice(&buf[..n]);
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                };
                let downstream = async {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(upstream, downstream);
            });
        }
    });
    (url, captured)
}

/// Which direction a [`cutting_proxy`] watches, and after how many bytes it breaks the
/// connection.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// After this many bytes from the server to the client (a download).
    Downstream(u64),
    /// After this many bytes from the client to the server (an upload).
    Upstream(u64),
}

/// Bytes a [`cutting_proxy`] has carried, over all connections.
#[derive(Default, Clone)]
pub struct Carried {
    down: Arc<std::sync::atomic::AtomicU64>,
    up: Arc<std::sync::atomic::AtomicU64>,
}

impl Carried {
    /// From the server to the client.
    pub fn down(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From the client to the server.
    pub fn up(&self) -> u64 {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either ends or `limit` bytes have passed, counting them.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: u64,
    counter: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut carried = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    while carried < limit {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n.min((limit - carried) as usize),
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        carried += n as u64;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A proxy to `upstream` that breaks its first connection (both directions, at once) at
/// `cut`; later connections pass untouched. Returns its `http://` URL and the byte counts.
pub async fn cutting_proxy(upstream: SocketAddr, cut: Cut) -> (String, Carried) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("proxy address"));
    let carried = Carried::default();
    let counted = carried.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (down_limit, up_limit) = match (std::mem::take(&mut first), cut) {
                (true, Cut::Downstream(n)) => (n, u64::MAX),
                (true, Cut::Upstream(n)) => (u64::MAX, n),
                (false, _) => (u64::MAX, u64::MAX),
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                // Whichever direction ends first ends the connection: dropping both halves
                // closes the sockets, which is what a broken link looks like to both ends.
                tokio::select! {
                    _ = pump(client_read, server_write, up_limit, counted.up.clone()) => {}
                    _ = pump(server_read, client_write, down_limit, counted.down.clone()) => {}
                }
            });
        }
    });
    (url, carried)
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client sent on one HTTP/2 connection: the payload of each stream's DATA frames
/// concatenated (padding removed), and the frames' other bytes (headers, settings, pings)
/// left as they were.
#[derive(Debug, Default)]
pub struct Http2Payloads {
    pub data: BTreeMap<u32, Vec<u8>>,
    pub other: Vec<u8>,
}

/// Splits a client's side of a plaintext HTTP/2 connection into frames. Panics on bytes
/// that are not HTTP/2: the capture must be understood completely for its absence of
/// findings to mean anything.
pub fn http2_payloads(connection: &[u8]) -> Http2Payloads {
    assert!(
        connection.starts_with(PREFACE),
        "the connection does not start with the HTTP/2 client preface"
    );
    let mut out = Http2Payloads::default();
    let mut rest = &connection[PREFACE.len()..];
    while !rest.is_empty() {
        // A connection cut mid-frame (the client stopped) leaves a partial frame: keep it
        // whole in `other` so that it is still searched.
        if rest.len() < 9 {
            out.other.extend_from_slice(rest);
            break;
        }
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        if rest.len() < 9 + len {
            out.other.extend_from_slice(rest);
            break;
        }
        let payload = &rest[9..9 + len];
        const DATA: u8 = 0;
        const PADDED: u8 = 0x8;
        if kind == DATA {
            let body = if flags & PADDED != 0 {
                let pad = usize::from(payload[0]);
                &payload[1..payload.len() - pad]
            } else {
                payload
            };
            out.data.entry(stream).or_default().extend_from_slice(body);
        } else {
            out.other.extend_from_slice(payload);
        }
        rest = &rest[9 + len..];
    }
    out
}

/// Every `width`-byte window of `bytes`, for [`find_any`].
pub fn windows(bytes: &[u8], width: usize) -> HashSet<Vec<u8>> {
    bytes.windows(width).map(<[u8]>::to_vec).collect()
}

/// The first offset in `haystack` where one of `needles` (all of length `width`) starts.
pub fn find_any(haystack: &[u8], needles: &HashSet<Vec<u8>>, width: usize) -> Option<usize> {
    haystack.windows(width).position(|w| needles.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn data_split_over_frames_and_padding_is_reassembled() {
        let mut conn = PREFACE.to_vec();
        conn.extend(frame(4, 0, 0, &[0; 6])); // SETTINGS
        conn.extend(frame(0, 0, 1, b"hello "));
        conn.extend(frame(0, 0, 3, b"other stream"));
        // PADDED: one pad-length byte, the data, then that many padding bytes.
        conn.extend(frame(0, 0x8, 1, b"\x03world\0\0\0"));
        let p = http2_payloads(&conn);
        assert_eq!(p.data[&1], b"hello world");
        assert_eq!(p.data[&3], b"other stream");
        assert_eq!(p.other, [0; 6]);
        // A window that spans the two frames is found only after reassembly.
        let needles = windows(b"lo wo", 5);
        assert!(find_any(&conn, &needles, 5).is_none());
        assert_eq!(find_any(&p.data[&1], &needles, 5), Some(3));
    }

    #[test]
    #[should_panic(expected = "HTTP/2 client preface")]
    fn a_capture_that_is_not_http2_is_refused() {
        http2_payloads(b"GET / HTTP/1.1\r\n\r\n");
    }
}
