//! A lab's local data in one language, as the lab holds it: a directory or list of `.txt`
//! and `.jsonl` files, turned into training examples and held-out evaluation data.
//!
//! - A `.txt` file is one plain-text document (NFC, blank lines dropped, lines re-joined with
//!   `\n`). It is kept as one stream rather than split at blank lines so that the model
//!   trains with as much context as a row holds; [`pack`] cuts long documents into rows. Labs
//!   that want documents kept apart put one document per file or per JSONL `text` record.
//! - A `.jsonl` file holds one example per record ([`jsonl`](super::jsonl)).
//!
//! Held out, per file: a `.txt` file's last `ceil(fraction × lines)` lines, as
//! [`LocalCorpus`](super::LocalCorpus) does, and a `.jsonl` file's last
//! `ceil(fraction × records)` records (at least one, and at least one left for training; a
//! file with a single line or record goes to training). Held-out plain text (the `.txt`
//! lines and JSONL `text` records) is joined with `\n` into [`HeldOut`] for loss and bits per
//! character; every held-out unit is also kept as an [`Example`] for a loss restricted to
//! the trained tokens (what a chat model's replies score).

use std::path::{Path, PathBuf};

use super::examples::{Example, ExampleBuilder};
use super::heldout::HeldOut;
use super::jsonl::{Record, read_jsonl};
use super::packing::{PackedRow, pack};
use super::text::{check_heldout_fraction, heldout_count, paragraph_lines, read_text};
use crate::error::CorpusError;

/// What a file holds, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.txt`: UTF-8 plain text.
    Text,
    /// `.jsonl`: one record a line.
    Jsonl,
}

impl FileKind {
    /// The kind of `path` by its extension (case-insensitive), if it is one this loader reads.
    pub fn of(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" => Some(FileKind::Text),
            "jsonl" => Some(FileKind::Jsonl),
            _ => None,
        }
    }
}

/// The data files named by `paths`: a file is taken as is (it must be `.txt` or `.jsonl`); a
/// directory contributes its `.txt` and `.jsonl` files, sorted by name, not recursing, and
/// skipping hidden files. Other files in a directory are skipped with a warning.
pub fn data_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, FileKind)>, CorpusError> {
    let mut files = Vec::new();
    for path in paths {
        let io = |source| CorpusError::Io {
            path: path.display().to_string(),
            source,
        };
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(io)?;
            entries.sort();
            for entry in entries {
                let hidden = entry
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if hidden || entry.is_dir() {
                    continue;
                }
                match FileKind::of(&entry) {
                    Some(kind) => files.push((entry, kind)),
                    None => tracing::warn!(
                        file = %entry.display(),
                        "skipping a file that is neither .txt nor .jsonl"
                    ),
                }
            }
        } else {
            std::fs::metadata(path).map_err(io)?;
            let kind = FileKind::of(path).ok_or_else(|| CorpusError::UnsupportedFile {
                path: path.display().to_string(),
            })?;
            files.push((path.clone(), kind));
        }
    }
    Ok(files)
}

/// A lab's data in one language: training examples and held-out data.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDataset {
    pub language: String,
    /// Training examples, in file order and, within a file, record order.
    pub train: Vec<Example>,
    /// Held-out plain text, for loss and bits per character; `None` when every held-out
    /// unit is a chat or prompt/response record.
    pub heldout: Option<HeldOut>,
    /// Every held-out unit as an example (a `.txt` file's held-out lines as one document,
    /// each held-out record as its own example).
    pub heldout_examples: Vec<Example>,
}

impl LocalDataset {
    /// Loads the files named by `paths` (see [`data_files`]) with `builder`'s tokenizer and
    /// chat format.
    pub fn load(
        paths: &[PathBuf],
        language: &str,
        heldout_fraction: f64,
        builder: &ExampleBuilder<'_>,
    ) -> Result<Self, CorpusError> {
        check_heldout_fraction(heldout_fraction)?;
        let mut train = Vec::new();
        let mut heldout_texts = Vec::new();
        let mut heldout_examples = Vec::new();
        for (path, kind) in data_files(paths)? {
            match kind {
                FileKind::Text => {
                    let text = read_text(&path)?;
                    let lines = paragraph_lines(&text);
                    let k = if lines.len() < 2 {
                        0
                    } else {
                        heldout_count(lines.len(), heldout_fraction)
                    };
                    let (train_lines, held) = lines.split_at(lines.len() - k);
                    if !train_lines.is_empty() {
                        let mut doc = train_lines.join("\n");
                        doc.push('\n');
                        train.push(builder.document(&doc)?);
                    }
                    if !held.is_empty() {
                        let held = held.join("\n");
                        heldout_examples.push(builder.document(&held)?);
                        heldout_texts.push(held);
                    }
                }
                FileKind::Jsonl => {
                    let records = read_jsonl(&path)?;
                    let k = if records.len() < 2 {
                        0
                    } else {
                        heldout_count(records.len(), heldout_fraction)
                    };
                    for (i, r) in records.iter().enumerate() {
                        let example =
                            builder.record(&r.record).map_err(|e| CorpusError::Record {
                                path: path.display().to_string(),
                                line: r.line,
                                source: Box::new(e),
                            })?;
                        if i < records.len() - k {
                            train.push(example);
                        } else {
                            if let Record::Text(text) = &r.record {
                                heldout_texts.push(text.clone());
                            }
                            heldout_examples.push(example);
                        }
                    }
                }
            }
        }
        let too_short = |reason: &str| CorpusError::TooShort {
            language: language.to_string(),
            reason: reason.to_string(),
        };
        if train.iter().all(|e| e.trained_targets() == 0) {
            return Err(too_short("nothing to train on in the given files"));
        }
        if heldout_examples.is_empty() {
            return Err(too_short(
                "nothing held out: every file has a single line or record",
            ));
        }
        let heldout = if heldout_texts.is_empty() {
            None
        } else {
            Some(HeldOut::from_text(
                &heldout_texts.join("\n"),
                builder.tokenizer(),
            )?)
        };
        Ok(LocalDataset {
            language: language.to_string(),
            train,
            heldout,
            heldout_examples,
        })
    }

    /// Number of trained predictions over all training examples: the sample weight `n_i`
    /// this participant reports (tokens the loss is taken on, not tokens read).
    pub fn train_samples(&self) -> usize {
        self.train.iter().map(Example::trained_targets).sum()
    }

    /// The training examples packed into rows of `seq_len` (see [`pack`]).
    pub fn packed_train(&self, seq_len: usize) -> Vec<PackedRow> {
        pack(&self.train, seq_len)
    }

    /// The held-out examples packed into rows of `seq_len`, scored with the training loss
    /// mask (replies, not prompts).
    pub fn packed_heldout(&self, seq_len: usize) -> Vec<PackedRow> {
        pack(&self.heldout_examples, seq_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::tests::tiny_bpe;
    use crate::data::{ByteTokenizer, LocalCorpus, TextTokenizer};

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_directory_of_text_and_jsonl_becomes_examples_and_heldout() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.txt", "one\n\ntwo\nthree\nfoure\u{301}\n");
        write(
            dir.path(),
            "b.jsonl",
            concat!(
                "{\"prompt\": \"q1\", \"response\": \"r1\"}\n",
                "{\"text\": \"plain record\"}\n",
                "\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"r\"}]}\n",
                "{\"text\": \"held out record\"}\n",
            ),
        );
        write(dir.path(), "notes.md", "skipped");
        write(dir.path(), ".hidden.txt", "skipped");
        let tok = tiny_bpe();
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        let ds = LocalDataset::load(&[dir.path().to_path_buf()], "vi", 0.25, &builder).unwrap();
        // a.txt: 4 lines, 1 held out; b.jsonl: 4 records, 1 held out.
        assert_eq!(ds.train.len(), 1 + 3);
        assert_eq!(ds.heldout_examples.len(), 2);
        assert_eq!(ds.train[0], builder.document("one\ntwo\nthree\n").unwrap());
        assert_eq!(ds.train[1], builder.prompt_response("q1", "r1").unwrap());
        let heldout = ds.heldout.as_ref().unwrap();
        assert_eq!(heldout.text, "four\u{e9}\nheld out record");
        assert_eq!(
            heldout.chars_started.iter().sum::<u32>() as usize,
            heldout.text.chars().count()
        );
        assert_eq!(
            ds.train_samples(),
            ds.train.iter().map(Example::trained_targets).sum::<usize>()
        );
        let rows = ds.packed_train(16);
        let trained: usize = rows.iter().map(PackedRow::trained_targets).sum();
        assert_eq!(trained, ds.train_samples());
    }

    #[test]
    fn record_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "chat.jsonl",
            "{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}\n",
        );
        let tok = tiny_bpe();
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        let err = LocalDataset::load(&[path], "lo", 0.5, &builder).unwrap_err();
        assert!(
            matches!(err, CorpusError::Record { line: 2, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("chat.jsonl:2: chat template"), "{msg}");
    }

    #[test]
    fn unsupported_files_and_bad_fractions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "data.csv", "a,b");
        let builder = ExampleBuilder::bytes();
        let err = LocalDataset::load(std::slice::from_ref(&path), "km", 0.1, &builder).unwrap_err();
        assert!(
            err.to_string().contains("data.csv: unsupported file type"),
            "{err}"
        );
        let err = LocalDataset::load(&[path], "km", 0.0, &builder).unwrap_err();
        assert!(err.to_string().contains("fraction"), "{err}");
        let missing = dir.path().join("missing.txt");
        let err = LocalDataset::load(&[missing], "km", 0.1, &builder).unwrap_err();
        assert!(err.to_string().contains("missing.txt"), "{err}");
        let one = write(dir.path(), "one.txt", "a single line\n");
        let err = LocalDataset::load(&[one], "km", 0.1, &builder).unwrap_err();
        assert!(err.to_string().contains("nothing held out"), "{err}");
    }

    /// With the byte tokenizer a single `.txt` file gives exactly what `LocalCorpus` gives.
    #[test]
    fn a_text_file_matches_local_corpus_with_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let text = "Article 1\nAll human beings are born free.\nArticle 2\nEveryone.\n";
        let path = write(dir.path(), "en.txt", text);
        let ds = LocalDataset::load(&[path], "en", 0.3, &ExampleBuilder::bytes()).unwrap();
        let corpus = LocalCorpus::from_text("en", text, 0.3, &ByteTokenizer).unwrap();
        assert_eq!(ds.train, [Example::all_trained(corpus.train.clone())]);
        assert_eq!(ds.heldout.as_ref(), Some(&corpus.heldout));
        assert_eq!(ds.train_samples(), corpus.train_samples() - 1);
        assert_eq!(ByteTokenizer.encode("a"), [97]);
    }
}
