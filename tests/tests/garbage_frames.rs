//! A participant that sends garbage: bytes that are not HTTP/2, HTTP/2 frames that break the
//! framing rules, and gRPC messages whose framing or protobuf body is malformed. Each gets a
//! clear answer on its own connection or stream (a GOAWAY with an error code, a gRPC status
//! naming the problem), and a federation running at the same time completes every round
//! with its honest labs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use bytes::Bytes;
use fedclient::participant;
use mekong_e2e::{Recorder, aggregator_config, corpus, participant_options, test_plan};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single garbage exchange may take before the test calls it a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Writes `bytes` on a fresh connection and reads until the server closes it. Returns what
/// the server sent; panics if it neither answers nor closes in time.
async fn send_and_drain(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything; a failed write is part of the answer.
    let _ = tcp.write_all(bytes).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(ANSWER_WITHIN, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept a garbage connection open");
    answer
}

/// The error code of the first GOAWAY frame (type 7) among the server's frames.
fn goaway_code(server_bytes: &[u8]) -> Option<u32> {
    let mut rest = server_bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let payload = rest.get(9..9 + len)?;
        if rest[3] == 7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        rest = &rest[9 + len..];
    }
    None
}

/// A gRPC status as a server sent it: the code and the percent-decoded message.
#[derive(Debug)]
struct GrpcStatus {
    code: u32,
    message: String,
}

/// Sends `body` as the whole request body of gRPC method `method` (the gRPC length prefix
/// is up to the caller) over raw HTTP/2, and returns the status the server answers with.
async fn raw_grpc(addr: SocketAddr, method: &str, body: Vec<u8>) -> GrpcStatus {
    tokio::time::timeout(ANSWER_WITHIN, async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/mekong.v1.Federation/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut send) = client.send_request(request, false).unwrap();
        // The server may answer (an unknown method, a bad prefix) and close the stream
        // before the body is sent; its answer is what is checked below.
        let _ = send.send_data(Bytes::from(body), true);
        let response = response.await.unwrap();
        let (head, mut body) = response.into_parts();
        let status_in = |headers: &http::HeaderMap| {
            let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
            let message = headers
                .get("grpc-message")
                .map(|m| percent_decode(m.as_bytes()))
                .unwrap_or_default();
            Some(GrpcStatus { code, message })
        };
        // A "trailers-only" answer carries the status in the headers.
        if let Some(status) = status_in(&head.headers) {
            return status;
        }
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().expect("gRPC trailers");
        status_in(&trailers).expect("a grpc-status trailer")
    })
    .await
    .expect("the server answers a malformed gRPC request in time")
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One gRPC length-prefixed message: flag, 4-byte big-endian length, body.
fn grpc_frame(compressed: bool, declared_len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&declared_len.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// gRPC status codes used below (grpc/doc/statuscodes.md).
const INTERNAL: u32 = 13;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNIMPLEMENTED: u32 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_clear_errors_and_the_federation_completes_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let plan = test_plan(2, 2, 2, 60_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let addr: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for code in ["lo", "km"] {
        labs.push(tokio::spawn(participant::run(
            participant_options(&server.url(), &format!("lab-{code}"), code),
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);

    // Not HTTP/2 at all: random bytes, then an HTTP/1.1 request. The server drops the
    // connection (after a GOAWAY when it got far enough to speak HTTP/2).
    let mut noise = vec![0u8; 4096];
    rng.fill_bytes(&mut noise);
    send_and_drain(addr, &noise).await;
    send_and_drain(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;

    // A valid preface and SETTINGS, then a frame far larger than the 16 KiB frame size the
    // server allows: GOAWAY with FRAME_SIZE_ERROR (0x6).
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    h2.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]); // 16 MiB DATA header
    h2.extend_from_slice(&noise);
    let answer = send_and_drain(addr, &h2).await;
    assert_eq!(goaway_code(&answer), Some(0x6), "FRAME_SIZE_ERROR expected");
    // A HEADERS frame on stream 0, which no request may use: PROTOCOL_ERROR (0x1).
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    h2.extend_from_slice(&[0, 0, 4, 1, 0x4, 0, 0, 0, 0]);
    h2.extend_from_slice(&noise[..4]);
    let answer = send_and_drain(addr, &h2).await;
    assert_eq!(goaway_code(&answer), Some(0x1), "PROTOCOL_ERROR expected");

    // Well-framed gRPC whose body is not protobuf: the decoder's reason comes back.
    for method in [
        "Join",
        "FetchTask",
        "SubmitUpdate",
        "SubmitUpdateStream",
        "SecureAggregate",
        "SubmitMasked",
        "MaskedReceived",
        "DownloadAdapter",
    ] {
        let body = [0xffu8; 24];
        let s = raw_grpc(addr, method, grpc_frame(false, body.len() as u32, &body)).await;
        assert_eq!(s.code, INTERNAL, "{method}: {s:?}");
        assert!(
            s.message.contains("failed to decode Protobuf message"),
            "{method}: {s:?}"
        );
    }
    // A length prefix of 4 GiB: refused from the prefix alone (the method's own limit,
    // `message_limits.rs`), naming the length and the limit's field.
    let s = raw_grpc(
        addr,
        "SubmitMasked",
        grpc_frame(false, u32::MAX, &noise[..64]),
    )
    .await;
    assert_eq!(s.code, RESOURCE_EXHAUSTED, "{s:?}");
    assert!(
        s.message.contains("limits.chunk_message_bytes")
            && s.message.contains(&u32::MAX.to_string()),
        "{s:?}"
    );
    // A message that claims compression the connection never negotiated.
    let s = raw_grpc(addr, "Join", grpc_frame(true, 8, &noise[..8])).await;
    assert_eq!(s.code, INTERNAL, "{s:?}");
    assert!(s.message.contains("compressed-flag"), "{s:?}");
    // A body cut short of its declared length.
    let s = raw_grpc(addr, "SubmitUpdate", grpc_frame(false, 1000, &noise[..10])).await;
    assert_eq!(s.code, INTERNAL, "{s:?}");
    assert!(s.message.to_lowercase().contains("eof"), "{s:?}");
    // An unknown method on the service.
    let s = raw_grpc(addr, "DropTables", grpc_frame(false, 0, &[])).await;
    assert_eq!(s.code, UNIMPLEMENTED, "{s:?}");

    // The honest labs were never disturbed: every round closes with both of them.
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;
    let history = server.status().history;
    assert_eq!(history.len(), 2);
    for record in &history {
        assert_eq!(record.contributors, vec!["lab-km", "lab-lo"], "{record:?}");
        assert!(record.dropped.is_empty(), "{record:?}");
    }
    assert_eq!(recorder.round(1).len(), 2);
    assert_eq!(recorder.round(2).len(), 2);
}
