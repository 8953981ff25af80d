//! Rationales: prompt templates, reasoning extraction, and a crash-safe streaming CSV.
//!
//! A rationale is a model's explanation, inside `<think>…</think>`, of why a review has its
//! label. [`extract_reasoning`] pulls the reasoning out of the generated text;
//! [`RationaleWriter`] appends finished rows batch by batch and, on resume, drops a torn last
//! row so that a run killed at any moment loses at most the batch it was writing.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The tag that opens the reasoning.
pub const THINK_OPEN: &str = "<think>";
/// The tag that closes the reasoning (also the usual stop string).
pub const THINK_CLOSE: &str = "</think>";

/// The default prompt: a film critic given the review and its correct label reasons inside
/// `<think>` tags (Qwen3 chat format; replace the file for other chat formats).
pub const DEFAULT_TEMPLATE: &str = include_str!("../../../data/templates/rationale.txt");

/// The CSV header, in order.
pub const COLUMNS: [&str; 7] = [
    "id",
    "sentiment",
    "review",
    "reasoning",
    "new_tokens",
    "finish_reason",
    "extraction",
];

/// What can go wrong with templates and rationale files.
#[derive(Debug, thiserror::Error)]
pub enum RationaleError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CSV layer failed.
    #[error("{path}: {source}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: csv::Error,
    },
    /// An existing output file is not a rationale CSV.
    #[error("{path}: header {found:?} is not the rationale header {COLUMNS:?}")]
    Header {
        /// The file.
        path: PathBuf,
        /// The header found.
        found: Vec<String>,
    },
    /// A template without exactly one `{review}`.
    #[error("template must contain `{{review}}` exactly once, found {0}")]
    Template(usize),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RationaleError + '_ {
    move |source| RationaleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A prompt template with `{review}` (once) and `{label}` (any number of times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
}

impl Template {
    /// Checks that `{review}` occurs exactly once.
    pub fn new(text: impl Into<String>) -> Result<Self, RationaleError> {
        let text = text.into();
        match text.matches("{review}").count() {
            1 => Ok(Self { text }),
            n => Err(RationaleError::Template(n)),
        }
    }

    /// The text before and after the review, with `{label}` filled in. The review goes
    /// between them; it is tokenized separately so that it cannot inject special tokens.
    pub fn split(&self, label: &str) -> (String, String) {
        let filled = self.text.replace("{label}", label);
        match filled.split_once("{review}") {
            Some((before, after)) => (before.to_string(), after.to_string()),
            // A label containing `{review}` cannot remove the one `new` checked for.
            None => (filled, String::new()),
        }
    }
}

/// How the reasoning was found in the generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Extraction {
    /// `<think>` at the start and a closing `</think>`.
    Both,
    /// Only the closing tag (the prompt opened the block): the text before it.
    CloseOnly,
    /// `<think>` opened and never closed (the row ran out of tokens): flagged.
    Unclosed,
    /// No tags at all: the whole text, flagged.
    NoTags,
}

impl Extraction {
    /// The CSV value: `both`, `close_only`, `unclosed`, `no_tags`.
    pub fn as_str(self) -> &'static str {
        match self {
            Extraction::Both => "both",
            Extraction::CloseOnly => "close_only",
            Extraction::Unclosed => "unclosed",
            Extraction::NoTags => "no_tags",
        }
    }

    /// The inverse of [`Extraction::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Both, Self::CloseOnly, Self::Unclosed, Self::NoTags]
            .into_iter()
            .find(|e| e.as_str() == s)
    }

    /// Whether the reasoning is a guess (the tags were not both there).
    pub fn flagged(self) -> bool {
        matches!(self, Extraction::Unclosed | Extraction::NoTags)
    }
}

/// The reasoning inside the generated text, trimmed.
///
/// Rules, in order: a leading stray `</think>` is dropped; a `<think>` counts only at the
/// very start (the model's own opening; one quoted later, e.g. from a review that contains
/// the tag, is part of the reasoning); the reasoning ends at the **last** `</think>`, because
/// generation stops at the first real closing tag, so any earlier one is quoted text.
/// Only the generated text is searched, never the prompt, so tags in the review itself
/// cannot move the boundaries.
pub fn extract_reasoning(generated: &str) -> (String, Extraction) {
    let mut text = generated.trim_start();
    if let Some(rest) = text.strip_prefix(THINK_CLOSE) {
        text = rest.trim_start();
    }
    let opened = match text.strip_prefix(THINK_OPEN) {
        Some(rest) => {
            text = rest;
            true
        }
        None => false,
    };
    let (body, extraction) = match (text.rfind(THINK_CLOSE), opened) {
        (Some(end), true) => (&text[..end], Extraction::Both),
        (Some(end), false) => (&text[..end], Extraction::CloseOnly),
        (None, true) => (text, Extraction::Unclosed),
        (None, false) => (text, Extraction::NoTags),
    };
    (body.trim().to_string(), extraction)
}

/// One output row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RationaleRow {
    /// The review's id in its source file.
    pub id: String,
    /// `negative` or `positive`.
    pub sentiment: String,
    /// The review as given to the model (cleaned, untruncated).
    pub review: String,
    /// The extracted reasoning.
    pub reasoning: String,
    /// Tokens generated for this row.
    pub new_tokens: usize,
    /// `eos`, `stop` or `length`.
    pub finish_reason: String,
    /// How the reasoning was found.
    pub extraction: Extraction,
}

/// Appends rationale rows to a CSV, one flushed write per batch.
#[derive(Debug)]
pub struct RationaleWriter {
    path: PathBuf,
    file: File,
}

impl RationaleWriter {
    /// Starts a new file (replacing any) with the header.
    pub fn create(path: &Path) -> Result<Self, RationaleError> {
        let mut file = File::create(path).map_err(io_err(path))?;
        file.write_all(&header_bytes()).map_err(io_err(path))?;
        file.sync_data().map_err(io_err(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues an existing file: keeps its complete rows, cuts a torn last row off
    /// (truncating the file to the end of the last complete record) and returns the ids
    /// already written. A missing or empty file is created.
    pub fn resume(path: &Path) -> Result<(Self, HashSet<String>), RationaleError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::create(path)?, HashSet::new()));
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let header = header_bytes();
        if bytes.len() <= header.len() && header.starts_with(&bytes) {
            // Killed while writing the header.
            return Ok((Self::create(path)?, HashSet::new()));
        }
        let (good_end, ids) = complete_records(path, &bytes)?;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        if good_end < bytes.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() as u64 - good_end,
                "dropping a torn last row"
            );
            file.set_len(good_end).map_err(io_err(path))?;
            file.sync_data().map_err(io_err(path))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let writer = Self {
            path: path.to_path_buf(),
            file,
        };
        Ok((writer, ids))
    }

    /// Writes `rows` with one `write` call, then flushes them to the disk.
    pub fn write_batch(&mut self, rows: &[RationaleRow]) -> Result<(), RationaleError> {
        let mut csv = csv_writer(Vec::new());
        for row in rows {
            let new_tokens = row.new_tokens.to_string();
            csv.write_record([
                row.id.as_str(),
                &row.sentiment,
                &row.review,
                &row.reasoning,
                &new_tokens,
                &row.finish_reason,
                row.extraction.as_str(),
            ])
            .map_err(|source| RationaleError::Csv {
                path: self.path.clone(),
                source,
            })?;
        }
        let buffer = csv.into_inner().map_err(|e| RationaleError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        self.file.write_all(&buffer).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Reads every complete row of a rationale CSV.
pub fn read_rationales(path: &Path) -> Result<Vec<RationaleRow>, RationaleError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let mut reader = csv::ReaderBuilder::new().from_reader(bytes.as_slice());
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|source| RationaleError::Csv {
            path: path.to_path_buf(),
            source,
        })?;
        let field = |i: usize| record.get(i).unwrap_or_default().to_string();
        rows.push(RationaleRow {
            id: field(0),
            sentiment: field(1),
            review: field(2),
            reasoning: field(3),
            new_tokens: field(4).parse().unwrap_or(0),
            finish_reason: field(5),
            extraction: Extraction::parse(&field(6)).unwrap_or(Extraction::NoTags),
        });
    }
    Ok(rows)
}

fn csv_writer<W: Write>(inner: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(inner)
}

fn header_bytes() -> Vec<u8> {
    let mut csv = csv_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = csv.write_record(COLUMNS);
    csv.into_inner().unwrap_or_default()
}

/// The byte offset just past the last complete record, and the ids of all complete records.
///
/// A record is complete when it has every column, a known `extraction` value, and its
/// newline terminator is in the file; the first record that fails ends the scan.
fn complete_records(path: &Path, bytes: &[u8]) -> Result<(u64, HashSet<String>), RationaleError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_reader(bytes);
    let mut record = csv::StringRecord::new();
    let mut ids = HashSet::new();
    let header_ok = matches!(reader.read_record(&mut record), Ok(true))
        && record.iter().eq(COLUMNS.iter().copied());
    if !header_ok {
        return Err(RationaleError::Header {
            path: path.to_path_buf(),
            found: record.iter().map(str::to_string).collect(),
        });
    }
    let mut good_end = reader.position().byte();
    while let Ok(true) = reader.read_record(&mut record) {
        let end = reader.position().byte();
        let terminated = end > 0 && bytes.get(end as usize - 1) == Some(&b'\n');
        let complete = record.len() == COLUMNS.len()
            && record.get(6).and_then(Extraction::parse).is_some()
            && terminated;
        if !complete {
            break;
        }
        ids.insert(record.get(0).unwrap_or_default().to_string());
        good_end = end;
    }
    Ok((good_end, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_between_both_tags() {
        let (r, e) = extract_reasoning("<think>\nThe acting is praised.\n</think>\n\npositive");
        assert_eq!(
            (r.as_str(), e),
            ("The acting is praised.", Extraction::Both)
        );
    }

    #[test]
    fn extracts_before_a_closing_tag_only() {
        let (r, e) = extract_reasoning("The plot is called dull.\n</think>");
        assert_eq!(
            (r.as_str(), e),
            ("The plot is called dull.", Extraction::CloseOnly)
        );
        assert!(!e.flagged());
    }

    #[test]
    fn drops_a_leading_stray_closing_tag() {
        let (r, e) = extract_reasoning("</think>\n\n<think>Loved the score.</think>");
        assert_eq!((r.as_str(), e), ("Loved the score.", Extraction::Both));
        let (r, e) = extract_reasoning(" </think>Hated it.");
        assert_eq!((r.as_str(), e), ("Hated it.", Extraction::NoTags));
    }

    #[test]
    fn no_tags_keeps_the_whole_text_flagged() {
        let (r, e) = extract_reasoning("  Just an answer: negative. ");
        assert_eq!(
            (r.as_str(), e),
            ("Just an answer: negative.", Extraction::NoTags)
        );
        assert!(e.flagged());
    }

    #[test]
    fn an_unclosed_think_keeps_the_rest_flagged() {
        let (r, e) = extract_reasoning("<think>The reviewer says it was a waste of");
        assert_eq!(
            (r.as_str(), e),
            ("The reviewer says it was a waste of", Extraction::Unclosed)
        );
        assert!(e.flagged());
    }

    #[test]
    fn tags_quoted_from_the_review_stay_in_the_reasoning() {
        // The review itself contained "<think>meh</think>"; the model quotes it.
        let generated = "<think>The review says \"<think>meh</think>\", a shrug.</think>";
        let (r, e) = extract_reasoning(generated);
        assert_eq!(
            (r.as_str(), e),
            (
                "The review says \"<think>meh</think>\", a shrug.",
                Extraction::Both
            )
        );
        // Quoted without the model's own opening tag.
        let (r, e) = extract_reasoning("It says \"<think>\" twice.</think>");
        assert_eq!(
            (r.as_str(), e),
            ("It says \"<think>\" twice.", Extraction::CloseOnly)
        );
    }

    #[test]
    fn template_splits_around_the_review() {
        let t = Template::new("A {label} review:\n{review}\nWhy {label}?").expect("valid");
        let (before, after) = t.split("positive");
        assert_eq!(before, "A positive review:\n");
        assert_eq!(after, "\nWhy positive?");
        assert!(Template::new("no slot").is_err());
        assert!(Template::new("{review}{review}").is_err());
        assert!(Template::new(DEFAULT_TEMPLATE).is_ok());
    }

    fn row(id: &str, review: &str) -> RationaleRow {
        RationaleRow {
            id: id.into(),
            sentiment: "positive".into(),
            review: review.into(),
            reasoning: "Because, \"quoted\"\nand multi-line.".into(),
            new_tokens: 7,
            finish_reason: "stop".into(),
            extraction: Extraction::CloseOnly,
        }
    }

    #[test]
    fn resume_keeps_complete_rows_and_cuts_a_torn_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.csv");
        let mut w = RationaleWriter::create(&path).expect("create");
        w.write_batch(&[row("1", "a, b"), row("2", "line\nbreak")])
            .expect("write");
        drop(w);
        let whole = std::fs::read(&path).expect("read");
        let mut w = RationaleWriter::create(&path).expect("create");
        w.write_batch(&[row("1", "a, b"), row("2", "line\nbreak"), row("3", "x")])
            .expect("write");
        drop(w);
        let full = std::fs::read(&path).expect("read");

        // Cut the third row at every byte: resume must keep exactly rows 1 and 2.
        for cut in whole.len()..full.len() {
            std::fs::write(&path, &full[..cut]).expect("write");
            let (mut w, ids) = RationaleWriter::resume(&path).expect("resume");
            let want: HashSet<String> = ["1", "2"].map(String::from).into();
            assert_eq!(ids, want, "cut at {cut}");
            assert_eq!(std::fs::read(&path).expect("read"), whole, "cut at {cut}");
            w.write_batch(&[row("3", "x")]).expect("append");
            assert_eq!(std::fs::read(&path).expect("read"), full, "cut at {cut}");
        }
        assert_eq!(read_rationales(&path).expect("read").len(), 3);
    }

    #[test]
    fn resume_creates_missing_or_header_only_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.csv");
        let (_, ids) = RationaleWriter::resume(&path).expect("missing");
        assert!(ids.is_empty());
        std::fs::write(&path, b"id,sent").expect("write");
        let (_, ids) = RationaleWriter::resume(&path).expect("torn header");
        assert!(ids.is_empty());
        assert_eq!(std::fs::read(&path).expect("read"), header_bytes());
        std::fs::write(&path, b"a,b,c\n1,2,3\n").expect("write");
        assert!(matches!(
            RationaleWriter::resume(&path),
            Err(RationaleError::Header { .. })
        ));
    }
}
