//! JSONL records: one JSON object a line, in one of three forms.
//!
//! ```text
//! {"text": "A document: trained on entirely."}
//! {"prompt": "Translate to Lao: water", "response": "ນ້ຳ"}
//! {"messages": [{"role": "system", "content": "..."},
//!               {"role": "user", "content": "..."},
//!               {"role": "assistant", "content": "..."}]}
//! ```
//!
//! Other fields (ids, sources, metadata) are ignored, but a record must use exactly one of
//! the three forms. Strings are normalised to NFC. Blank lines are skipped. A malformed line
//! fails the whole file with an error naming the file, the 1-based line number and what is
//! wrong: a lab fixing its data needs to find the line, and silently dropping records would
//! change what the federation trains on without anyone noticing.

use std::path::Path;

use serde_json::{Map, Value};

use super::chat::{Message, Role};
use super::text::nfc;
use crate::error::CorpusError;

/// One training record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Plain text, trained on entirely.
    Text(String),
    /// A single exchange: loss on the response only.
    PromptResponse { prompt: String, response: String },
    /// A conversation: loss on the assistant turns only.
    Messages(Vec<Message>),
}

/// A record and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlRecord {
    /// 1-based line number in the file.
    pub line: usize,
    pub record: Record,
}

/// Reads a JSONL file. See the [module documentation](self) for the forms and errors.
pub fn read_jsonl(path: &Path) -> Result<Vec<JsonlRecord>, CorpusError> {
    let bytes = std::fs::read(path).map_err(|source| CorpusError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_jsonl(&path.display().to_string(), &bytes)
}

/// Parses JSONL `bytes`; `path` names the source in errors.
pub fn parse_jsonl(path: &str, bytes: &[u8]) -> Result<Vec<JsonlRecord>, CorpusError> {
    let mut records = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let fail = |reason: String| CorpusError::Jsonl {
            path: path.to_string(),
            line,
            reason,
        };
        let text = std::str::from_utf8(raw).map_err(|e| {
            fail(format!(
                "not valid UTF-8 at byte {} of the line",
                e.valid_up_to()
            ))
        })?;
        let text = if line == 1 {
            text.strip_prefix('\u{FEFF}').unwrap_or(text)
        } else {
            text
        };
        if text.trim().is_empty() {
            continue;
        }
        let record = parse_record(text).map_err(fail)?;
        records.push(JsonlRecord { line, record });
    }
    Ok(records)
}

/// Parses one non-blank line into a record; the error says what is wrong with it.
pub fn parse_record(line: &str) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        // serde_json ends its message with "at line 1 column N"; within one line only the
        // column means anything.
        let msg = e.to_string();
        let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
        format!("not valid JSON at column {}: {msg}", e.column())
    })?;
    let obj = match value {
        Value::Object(obj) => obj,
        other => return Err(format!("expected a JSON object, found {}", kind(&other))),
    };
    let has_text = obj.contains_key("text");
    let has_pair = obj.contains_key("prompt") || obj.contains_key("response");
    let has_messages = obj.contains_key("messages");
    match (has_text, has_pair, has_messages) {
        (false, false, false) => {
            Err("empty record: expected `text`, `prompt` + `response`, or `messages`".to_string())
        }
        (true, false, false) => Ok(Record::Text(string_field(&obj, "text")?)),
        (false, true, false) => {
            for (have, need) in [("prompt", "response"), ("response", "prompt")] {
                if obj.contains_key(have) && !obj.contains_key(need) {
                    return Err(format!("field `{need}` is missing (`{have}` needs it)"));
                }
            }
            Ok(Record::PromptResponse {
                prompt: string_field(&obj, "prompt")?,
                response: string_field(&obj, "response")?,
            })
        }
        (false, false, true) => messages(&obj["messages"]).map(Record::Messages),
        _ => Err(
            "record mixes `text`, `prompt`/`response` and `messages`: use one form a line"
                .to_string(),
        ),
    }
}

/// A required, non-blank string field, NFC-normalised.
fn string_field(obj: &Map<String, Value>, field: &str) -> Result<String, String> {
    match obj.get(field) {
        None => Err(format!("field `{field}` is missing")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field `{field}` is empty")),
        Some(Value::String(s)) => Ok(nfc(s)),
        Some(other) => Err(format!(
            "field `{field}`: expected a string, found {}",
            kind(other)
        )),
    }
}

fn messages(value: &Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "field `messages`: expected an array, found {}",
            kind(value)
        ));
    };
    if items.is_empty() {
        return Err("field `messages` is empty".to_string());
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(format!(
                "`messages[{i}]`: expected an object with `role` and `content`, found {}",
                kind(item)
            ));
        };
        let role = match m.get("role") {
            None => return Err(format!("`messages[{i}].role` is missing")),
            Some(Value::String(r)) => Role::parse(r).ok_or_else(|| {
                format!(
                    "`messages[{i}].role`: unknown role `{r}` (expected system, user or assistant)"
                )
            })?,
            Some(other) => {
                return Err(format!(
                    "`messages[{i}].role`: expected a string, found {}",
                    kind(other)
                ));
            }
        };
        let content = match m.get("content") {
            None => return Err(format!("`messages[{i}].content` is missing")),
            Some(Value::String(c)) => nfc(c),
            Some(other) => {
                return Err(format!(
                    "`messages[{i}].content`: expected a string, found {}",
                    kind(other)
                ));
            }
        };
        if role == Role::Assistant && content.trim().is_empty() {
            return Err(format!(
                "`messages[{i}].content` is empty: an assistant turn is what is trained on"
            ));
        }
        out.push(Message { role, content });
    }
    if !out.iter().any(|m| m.role == Role::Assistant) {
        return Err("`messages` has no assistant message: nothing to train on".to_string());
    }
    Ok(out)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<JsonlRecord>, CorpusError> {
        parse_jsonl("lab/chat.jsonl", text.as_bytes())
    }

    #[test]
    fn reads_the_three_forms_skipping_blank_lines() {
        let text = concat!(
            "{\"text\": \"Cafe\u{301}\", \"id\": 7}\n",
            "\n",
            "  \r\n",
            "{\"prompt\": \"p\", \"response\": \"r\"}\r\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, ",
            "{\"role\": \"assistant\", \"content\": \"a\"}]}",
        );
        let records = parse(text).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].line, 1);
        // NFC: e + combining acute is one code point after loading.
        assert_eq!(records[0].record, Record::Text("Caf\u{e9}".into()));
        assert_eq!(records[1].line, 4);
        assert_eq!(
            records[1].record,
            Record::PromptResponse {
                prompt: "p".into(),
                response: "r".into()
            }
        );
        assert_eq!(records[2].line, 5);
        let Record::Messages(m) = &records[2].record else {
            panic!("{:?}", records[2]);
        };
        assert_eq!(m[1].role, Role::Assistant);
    }

    #[test]
    fn nfc_is_applied_to_prompts_responses_and_messages() {
        let text = concat!(
            "{\"prompt\": \"Vie\u{302}\u{323}t\", \"response\": \"Vie\u{302}\u{323}t\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"e\u{301}\"}, ",
            "{\"role\": \"assistant\", \"content\": \"e\u{301}\"}]}\n",
        );
        let records = parse(text).unwrap();
        assert_eq!(
            records[0].record,
            Record::PromptResponse {
                prompt: "Vi\u{1EC7}t".into(),
                response: "Vi\u{1EC7}t".into()
            }
        );
        let Record::Messages(m) = &records[1].record else {
            panic!()
        };
        assert!(m.iter().all(|m| m.content == "\u{e9}"));
    }

    /// Every kind of malformed line fails with the file, its 1-based line number and what
    /// is wrong; the good lines before it do not hide it.
    #[test]
    fn malformed_lines_fail_with_their_line_number() {
        let good = "{\"text\": \"fine\"}\n\n";
        let cases: &[(&str, &str)] = &[
            ("{\"text\": \"unterminated}", "not valid JSON"),
            ("[1, 2]", "expected a JSON object, found an array"),
            ("{}", "empty record"),
            ("{\"id\": 3}", "empty record"),
            (
                "{\"text\": 5}",
                "field `text`: expected a string, found a number",
            ),
            ("{\"text\": \"  \"}", "field `text` is empty"),
            ("{\"prompt\": \"p\"}", "field `response` is missing"),
            ("{\"response\": \"r\"}", "field `prompt` is missing"),
            (
                "{\"prompt\": null, \"response\": \"r\"}",
                "field `prompt`: expected a string, found null",
            ),
            (
                "{\"text\": \"t\", \"prompt\": \"p\", \"response\": \"r\"}",
                "mixes",
            ),
            ("{\"messages\": {}}", "expected an array, found an object"),
            ("{\"messages\": []}", "field `messages` is empty"),
            (
                "{\"messages\": [\"hi\"]}",
                "`messages[0]`: expected an object",
            ),
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                "`messages[0].role`: unknown role `bot`",
            ),
            (
                "{\"messages\": [{\"content\": \"x\"}]}",
                "`messages[0].role` is missing",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\"}]}",
                "`messages[1].content` is missing",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": [1]}]}",
                "`messages[0].content`: expected a string, found an array",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}",
                "no assistant message",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"\"}]}",
                "`messages[1].content` is empty",
            ),
        ];
        for (bad, expected) in cases {
            let text = format!("{good}{bad}\n{good}");
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(err, CorpusError::Jsonl { line: 3, .. }),
                "{bad}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.starts_with("lab/chat.jsonl:3: "), "{bad}: {msg}");
            assert!(msg.contains(expected), "{bad}: {msg}");
        }
    }

    #[test]
    fn invalid_utf8_and_bad_json_name_the_column() {
        let err = parse_jsonl("x.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"\xFF\"}\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.jsonl:2: not valid UTF-8 at byte 10 of the line"
        );
        let err = parse("{\"text\": \"a\",}").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("lab/chat.jsonl:1: not valid JSON at column 14"),
            "{msg}"
        );
        assert!(!msg.contains("at line"), "{msg}");
    }

    #[test]
    fn a_leading_bom_is_not_an_error() {
        let records = parse("\u{FEFF}{\"text\": \"a\"}").unwrap();
        assert_eq!(records[0].record, Record::Text("a".into()));
    }
}
