//! What one caller can make the aggregator hold, and for how long (issue #26): the
//! `[limits]` section of the configuration, with defaults sized for the messages honest labs
//! send, each a field the operator can raise or lower.
//!
//! The limits are enforced where bytes arrive, before any handler buffers them:
//! [`crate::message_limits`] reads the gRPC framing of every request and refuses a message
//! larger than its method's limit at its 5-byte header, a caller whose unfinished messages
//! would pass its budget, and a unary request whose body is not complete in time. The
//! handlers then bound what they keep: masked-input reading slots, the idle time of a
//! stream, and plaintext updates held for a broken stream to resume.
//!
//! The bound that follows, stated in the operator docs and measured by
//! `tests/tests/hostile_memory.rs`: bytes held for unfinished requests are at most
//! `unfinished_bytes_per_caller` per caller (a certificate's name under mutual TLS; a
//! connection without TLS, which has no identity to count by), whatever the number of its
//! connections and streams; held partial updates at most `held_partial_update_bytes` in
//! all.

use serde::{Deserialize, Serialize};

use crate::admin::Rpc;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Room for everything but the values in an update or masked chunk (ids, hashes, offsets,
/// training metrics).
const ENVELOPE_BYTES: usize = 64 * KIB;

/// Bytes of values a lab puts in one `SubmitUpdateStream` or `SubmitMasked` chunk (1 MiB);
/// fedclient never sends more.
pub const LAB_CHUNK_VALUE_BYTES: usize = MIB;

/// Bytes of values a lab sends in one `SubmitUpdate` message (4 MiB); larger updates go
/// through `SubmitUpdateStream`.
pub const LAB_ONE_MESSAGE_VALUE_BYTES: usize = 4 * MIB;

/// The `[limits]` section. Every field has a default; a field left out keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest message of the small calls: Join, FetchTask, UpdateReceived, MaskedReceived,
    /// RoundStatus, ReportMetrics, DownloadAdapter, Leave (default 64 KiB; they carry ids,
    /// a name, a language and a few numbers).
    pub control_message_bytes: usize,
    /// Largest `SecureAggregate` message (default 4 MiB). ShareKeys and the unmasking answer
    /// carry about 100 bytes per member of the cohort: 4 MiB serves some 40,000.
    pub secure_message_bytes: usize,
    /// Largest `SubmitUpdate` message, only taken when secure aggregation is off (default
    /// 4 MiB + 64 KiB: labs send at most 4 MiB of values in one message).
    pub update_message_bytes: usize,
    /// Largest chunk of `SubmitUpdateStream` and `SubmitMasked` (default 1 MiB + 64 KiB:
    /// labs send 1 MiB of values per chunk).
    pub chunk_message_bytes: usize,
    /// Bytes of unfinished messages one caller (one certificate under mutual TLS, one
    /// connection without it) may have in flight over all its connections and streams
    /// (default 16 MiB): a message counts from its header until its last byte has arrived. An honest lab has one chunk or update message and a few small
    /// calls in flight.
    pub unfinished_bytes_per_caller: usize,
    /// Time for a unary call's request to arrive whole (default 30 s); a call still sending
    /// is then cut. Streams are paced by `stream_idle_timeout_ms` instead.
    pub request_body_timeout_ms: u64,
    /// Longest a `SubmitUpdateStream` or `SubmitMasked` stream may go without a chunk
    /// (default 30 s); it is then cut (a masked one retracted, a plaintext one held for its
    /// lab to resume).
    pub stream_idle_timeout_ms: u64,
    /// Masked-input streams read at once (default 8); the rest wait within the stage
    /// deadline. Each holds about one chunk.
    pub masked_streams: usize,
    /// HTTP/2 streams (concurrent calls) per connection (default 32).
    pub streams_per_connection: u32,
    /// Bytes of broken plaintext update streams held for their labs to resume, in all
    /// (default 1 GiB; one per lab, of at most the round's upload size). Past it, a broken
    /// stream's bytes are dropped and its lab sends again from the start.
    pub held_partial_update_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            control_message_bytes: 64 * KIB,
            secure_message_bytes: 4 * MIB,
            update_message_bytes: LAB_ONE_MESSAGE_VALUE_BYTES + ENVELOPE_BYTES,
            chunk_message_bytes: LAB_CHUNK_VALUE_BYTES + ENVELOPE_BYTES,
            unfinished_bytes_per_caller: 16 * MIB,
            request_body_timeout_ms: 30_000,
            stream_idle_timeout_ms: 30_000,
            masked_streams: 8,
            streams_per_connection: 32,
            held_partial_update_bytes: 1024 * MIB,
        }
    }
}

impl LimitsSection {
    /// Each limit leaves room for what honest labs send; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let at_least = |field: &'static str, value: usize, min: usize, why: &str| {
            if value < min {
                Err((field, format!("{value} is below {min}: {why}")))
            } else {
                Ok(())
            }
        };
        at_least(
            "limits.control_message_bytes",
            self.control_message_bytes,
            4 * KIB,
            "a Join or ReportMetrics message needs a few KiB",
        )?;
        at_least(
            "limits.secure_message_bytes",
            self.secure_message_bytes,
            64 * KIB,
            "a cohort's ShareKeys message needs about 100 bytes per member",
        )?;
        at_least(
            "limits.update_message_bytes",
            self.update_message_bytes,
            LAB_ONE_MESSAGE_VALUE_BYTES + 4 * KIB,
            "labs send up to 4 MiB of values in one SubmitUpdate",
        )?;
        at_least(
            "limits.chunk_message_bytes",
            self.chunk_message_bytes,
            LAB_CHUNK_VALUE_BYTES + 4 * KIB,
            "labs send chunks of 1 MiB of values",
        )?;
        let largest = self
            .secure_message_bytes
            .max(self.update_message_bytes)
            .max(self.chunk_message_bytes);
        at_least(
            "limits.unfinished_bytes_per_caller",
            self.unfinished_bytes_per_caller,
            largest + self.control_message_bytes,
            "a lab needs its largest message and a small call in flight at once",
        )?;
        for (field, ms) in [
            (
                "limits.request_body_timeout_ms",
                self.request_body_timeout_ms,
            ),
            ("limits.stream_idle_timeout_ms", self.stream_idle_timeout_ms),
        ] {
            if ms < 1_000 {
                return Err((
                    field,
                    format!("{ms} ms is below 1000: too short for a lab on a slow link"),
                ));
            }
        }
        if self.masked_streams == 0 {
            return Err(("limits.masked_streams", "must be at least 1".into()));
        }
        if self.streams_per_connection < 4 {
            return Err((
                "limits.streams_per_connection",
                format!(
                    "{} is below 4: a lab's long-poll, upload and reports run at once",
                    self.streams_per_connection
                ),
            ));
        }
        Ok(())
    }

    /// The largest message `rpc` takes, and the field that sets it. `None`: the method is
    /// not one of the service's (the router answers UNIMPLEMENTED).
    pub fn message_limit(&self, rpc: Rpc) -> Option<(usize, &'static str)> {
        Some(match rpc {
            Rpc::SecureAggregate => (self.secure_message_bytes, "limits.secure_message_bytes"),
            Rpc::SubmitUpdate => (self.update_message_bytes, "limits.update_message_bytes"),
            Rpc::SubmitUpdateStream | Rpc::SubmitMasked => {
                (self.chunk_message_bytes, "limits.chunk_message_bytes")
            }
            Rpc::Join
            | Rpc::FetchTask
            | Rpc::UpdateReceived
            | Rpc::MaskedReceived
            | Rpc::RoundStatus
            | Rpc::ReportMetrics
            | Rpc::DownloadAdapter
            | Rpc::Leave => (self.control_message_bytes, "limits.control_message_bytes"),
            Rpc::Other => return None,
        })
    }

    /// The largest message of any method: tonic's own decoding limit, behind the
    /// per-method ones.
    pub fn largest_message(&self) -> usize {
        self.control_message_bytes
            .max(self.secure_message_bytes)
            .max(self.update_message_bytes)
            .max(self.chunk_message_bytes)
    }

    pub fn request_body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_body_timeout_ms)
    }

    pub fn stream_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.stream_idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_fit_what_labs_send() {
        let limits = LimitsSection::default();
        limits.validate().unwrap();
        assert!(limits.chunk_message_bytes > LAB_CHUNK_VALUE_BYTES);
        assert!(limits.update_message_bytes > LAB_ONE_MESSAGE_VALUE_BYTES);
        assert_eq!(limits.largest_message(), limits.update_message_bytes);
        assert_eq!(
            limits.message_limit(Rpc::SubmitMasked),
            Some((limits.chunk_message_bytes, "limits.chunk_message_bytes"))
        );
        assert_eq!(limits.message_limit(Rpc::Other), None);
    }

    #[test]
    fn a_limit_below_what_labs_send_is_refused_by_field() {
        type Change = fn(&mut LimitsSection);
        let cases: [(Change, &str); 6] = [
            (
                |l| l.chunk_message_bytes = MIB,
                "limits.chunk_message_bytes",
            ),
            (
                |l| l.update_message_bytes = MIB,
                "limits.update_message_bytes",
            ),
            (
                |l| l.control_message_bytes = 100,
                "limits.control_message_bytes",
            ),
            (
                |l| l.unfinished_bytes_per_caller = 4 * MIB,
                "limits.unfinished_bytes_per_caller",
            ),
            (|l| l.masked_streams = 0, "limits.masked_streams"),
            (
                |l| l.stream_idle_timeout_ms = 10,
                "limits.stream_idle_timeout_ms",
            ),
        ];
        for (change, field) in cases {
            let mut limits = LimitsSection::default();
            change(&mut limits);
            let (named, message) = limits.validate().unwrap_err();
            assert_eq!(named, field, "{message}");
        }
    }
}
