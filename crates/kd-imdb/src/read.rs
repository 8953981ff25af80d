//! Readers for the layouts the IMDB dataset is distributed in.
//!
//! | layout | reader | splits | id |
//! | --- | --- | --- | --- |
//! | Stanford `aclImdb_v1.tar.gz` | [`read_aclimdb_archive`] | train, test | `<file>_<rating>` |
//! | its extracted `aclImdb/` folder | [`read_aclimdb_dir`] | train, test | `<file>_<rating>` |
//! | Kaggle `labeledTrainData.tsv` | [`read_kaggle_tsv`] | train | `<file>_<rating>` |
//! | `review,sentiment` CSV | [`read_csv`] | train | row number |
//!
//! The rating is taken from the id where there is one; the CSV layout has none.
//!
//! Texts are returned as stored, `<br />` tags included; [`crate::clean_review`] removes them.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::read::GzDecoder;
use tracing::info;

use crate::{Corpus, Error, Result, Review, Sentiment, Split};

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads whichever layout `path` holds: a folder is read with [`read_aclimdb_dir`], a
/// `.tar.gz`/`.tgz` file with [`read_aclimdb_archive`], a `.tsv` with [`read_kaggle_tsv`] and a
/// `.csv` with [`read_csv`].
pub fn read_any(path: impl AsRef<Path>) -> Result<Corpus> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return read_aclimdb_dir(path);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        read_aclimdb_archive(path)
    } else if name.ends_with(".tsv") {
        read_kaggle_tsv(path)
    } else if name.ends_with(".csv") {
        read_csv(path)
    } else {
        Err(Error::Format {
            path: path.to_path_buf(),
            message: "cannot tell the layout from the name; expected a folder, .tar.gz, .tgz, \
                      .tsv or .csv"
                .into(),
        })
    }
}

/// Streams the Stanford archive (`aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`) without
/// extracting it. Other entries (`train/unsup`, `imdb.vocab`, `.feat` files) are skipped.
///
/// Reviews are sorted by label (negative first) and then by numeric file id, so the result
/// does not depend on the archive's entry order.
pub fn read_aclimdb_archive(path: impl AsRef<Path>) -> Result<Corpus> {
    let path = path.as_ref();
    let start = Instant::now();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::with_capacity(1 << 20, file)));
    let mut found = Vec::new();
    let mut buf = Vec::new();
    for entry in archive.entries().map_err(|e| Error::io(path, e))? {
        let mut entry = entry.map_err(|e| Error::io(path, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| Error::io(path, e))?
            .to_string_lossy()
            .into_owned();
        let components: Vec<&str> = name.split('/').collect();
        let Some((split, label, file_name)) = review_location(&components) else {
            continue;
        };
        buf.clear();
        entry
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(path, e))?;
        let review = parse_review_file(label, file_name, &buf).map_err(|message| Error::Entry {
            path: path.to_path_buf(),
            entry: name,
            message,
        })?;
        found.push((split, review));
    }
    let corpus = into_corpus(path, found)?;
    info!(
        path = %path.display(),
        train = corpus.train.len(),
        test = corpus.test.len(),
        secs = start.elapsed().as_secs_f64(),
        "read aclImdb archive"
    );
    Ok(corpus)
}

/// Reads an extracted aclImdb folder: either `aclImdb/` itself or the folder containing it.
///
/// A missing `train` or `test` half is allowed (that split is empty); a half without both its
/// `pos` and `neg` folders is an error. Reviews are sorted as in [`read_aclimdb_archive`].
pub fn read_aclimdb_dir(path: impl AsRef<Path>) -> Result<Corpus> {
    let given = path.as_ref();
    let start = Instant::now();
    let root = if given.join("aclImdb").is_dir() {
        given.join("aclImdb")
    } else {
        given.into()
    };
    let mut found = Vec::new();
    for split in [Split::Train, Split::Test] {
        let split_dir = root.join(split.name());
        if !split_dir.is_dir() {
            continue;
        }
        for (label, folder) in [(Sentiment::Negative, "neg"), (Sentiment::Positive, "pos")] {
            let dir = split_dir.join(folder);
            let listing = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for dir_entry in listing {
                let dir_entry = dir_entry.map_err(|e| Error::io(&dir, e))?;
                let file_path = dir_entry.path();
                if !dir_entry
                    .file_type()
                    .map_err(|e| Error::io(&file_path, e))?
                    .is_file()
                {
                    continue;
                }
                let entry_name = || {
                    let relative = file_path.strip_prefix(&root).unwrap_or(&file_path);
                    relative.display().to_string()
                };
                let Some(file_name) = file_path.file_name().and_then(|n| n.to_str()) else {
                    return Err(Error::Entry {
                        path: root.clone(),
                        entry: entry_name(),
                        message: "file name is not valid UTF-8".into(),
                    });
                };
                let bytes = std::fs::read(&file_path).map_err(|e| Error::io(&file_path, e))?;
                let review = parse_review_file(label, file_name, &bytes).map_err(|message| {
                    Error::Entry {
                        path: root.clone(),
                        entry: entry_name(),
                        message,
                    }
                })?;
                found.push((split, review));
            }
        }
    }
    let corpus = into_corpus(&root, found)?;
    info!(
        path = %root.display(),
        train = corpus.train.len(),
        test = corpus.test.len(),
        secs = start.elapsed().as_secs_f64(),
        "read aclImdb folder"
    );
    Ok(corpus)
}

/// Reads Kaggle's `labeledTrainData.tsv` ("Bag of Words Meets Bags of Popcorn") into the
/// train split.
///
/// The file is tab-separated without CSV quoting: header `id\tsentiment\treview`, an id
/// `"<file id>_<rating>"`, a 0/1 sentiment and a review wrapped in double quotes in which `"`
/// and `\` are escaped by a backslash (other backslashes are kept as they are). A UTF-8 BOM,
/// CRLF line endings and blank lines are accepted.
pub fn read_kaggle_tsv(path: impl AsRef<Path>) -> Result<Corpus> {
    let path = path.as_ref();
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let data = data.strip_prefix(UTF8_BOM).unwrap_or(&data);
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::Format {
            path: path.into(),
            message: "empty file".into(),
        });
    }
    let parse_err = |line: u64, field: &str, message: String| Error::Parse {
        path: path.into(),
        line,
        field: field.into(),
        message,
    };
    const FIELDS: [&str; 3] = ["id", "sentiment", "review"];
    let mut train = Vec::new();
    let mut header_seen = false;
    for (index, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line = index as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let parts: Vec<&[u8]> = raw.split(|&b| b == b'\t').collect();
        if parts.len() != FIELDS.len() {
            return Err(parse_err(
                line,
                "record",
                format!(
                    "expected 3 tab-separated fields (id, sentiment, review), found {}",
                    parts.len()
                ),
            ));
        }
        let mut fields = [""; 3];
        for ((slot, bytes), name) in fields.iter_mut().zip(&parts).zip(FIELDS) {
            *slot = std::str::from_utf8(bytes).map_err(|e| {
                parse_err(
                    line,
                    name,
                    format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                )
            })?;
        }
        if !header_seen {
            if fields != FIELDS {
                return Err(parse_err(
                    line,
                    "record",
                    format!("expected the header `id\\tsentiment\\treview`, found {fields:?}"),
                ));
            }
            header_seen = true;
            continue;
        }
        let [id, sentiment, review] = fields;
        let id = unquote_plain(id).map_err(|m| parse_err(line, "id", m))?;
        let rating = rating_from_id(id).map_err(|m| parse_err(line, "id", m))?;
        let label = match sentiment {
            "0" => Sentiment::Negative,
            "1" => Sentiment::Positive,
            other => {
                return Err(parse_err(
                    line,
                    "sentiment",
                    format!("expected 0 or 1, found {other:?}"),
                ));
            }
        };
        let text = unquote_escaped(review).map_err(|m| parse_err(line, "review", m))?;
        train.push(Review {
            id: id.to_string(),
            text,
            label,
            rating,
        });
    }
    info!(path = %path.display(), train = train.len(), "read Kaggle TSV");
    Ok(Corpus {
        train,
        test: Vec::new(),
    })
}

/// Reads a `review,sentiment` CSV (the common Kaggle "IMDB Dataset.csv" layout) into the
/// train split.
///
/// Columns are found by header name (case-insensitive, any order, extra columns ignored);
/// fields follow RFC 4180 quoting. The sentiment is `positive` or `negative`
/// (case-insensitive). Ids are zero-based data-row numbers, as a pandas index would give.
pub fn read_csv(path: impl AsRef<Path>) -> Result<Corpus> {
    let path = path.as_ref();
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let data = data.strip_prefix(UTF8_BOM).unwrap_or(&data);
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::Format {
            path: path.into(),
            message: "empty file".into(),
        });
    }
    let parse_err = |line: u64, field: &str, message: String| Error::Parse {
        path: path.into(),
        line,
        field: field.into(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(data);
    let headers = reader
        .byte_headers()
        .map_err(|e| csv_error(path, e))?
        .clone();
    let names: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_lowercase())
        .collect();
    let column = |name: &str| {
        names.iter().position(|n| n == name).ok_or_else(|| {
            parse_err(
                1,
                name,
                format!("missing column `{name}` in header {names:?}"),
            )
        })
    };
    let (review_col, sentiment_col) = (column("review")?, column("sentiment")?);
    // The csv crate reads an unterminated quoted field silently up to the end of the file.
    if let Some((line, field)) = find_unterminated_quote(data) {
        let field = names.get(field).map_or("record", String::as_str);
        return Err(parse_err(
            line,
            field,
            "unterminated quote: no closing `\"`".into(),
        ));
    }
    let mut train = Vec::new();
    let mut record = csv::ByteRecord::new();
    while reader
        .read_byte_record(&mut record)
        .map_err(|e| csv_error(path, e))?
    {
        let line = record.position().map_or(0, csv::Position::line);
        if record.len() != names.len() {
            return Err(parse_err(
                line,
                "record",
                format!("expected {} fields, found {}", names.len(), record.len()),
            ));
        }
        let field = |index: usize| {
            let name = &names[index];
            std::str::from_utf8(&record[index]).map_err(|e| {
                parse_err(
                    line,
                    name,
                    format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                )
            })
        };
        let sentiment = field(sentiment_col)?.trim();
        let label = if sentiment.eq_ignore_ascii_case("positive") {
            Sentiment::Positive
        } else if sentiment.eq_ignore_ascii_case("negative") {
            Sentiment::Negative
        } else {
            return Err(parse_err(
                line,
                "sentiment",
                format!("expected `positive` or `negative`, found {sentiment:?}"),
            ));
        };
        let text = field(review_col)?.to_string();
        train.push(Review {
            id: train.len().to_string(),
            text,
            label,
            rating: None,
        });
    }
    info!(path = %path.display(), train = train.len(), "read CSV");
    Ok(Corpus {
        train,
        test: Vec::new(),
    })
}

/// Where a review file sits in the aclImdb layout: split, label and file name, or `None` for
/// entries that are not review files (folders, `unsup`, vocabulary and feature files).
fn review_location<'a>(components: &[&'a str]) -> Option<(Split, Sentiment, &'a str)> {
    let parts: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let parts = match parts.first() {
        Some(&"aclImdb") => &parts[1..],
        _ => &parts[..],
    };
    let [split, label, file_name] = parts else {
        return None;
    };
    let split = match *split {
        "train" => Split::Train,
        "test" => Split::Test,
        _ => return None,
    };
    let label = match *label {
        "neg" => Sentiment::Negative,
        "pos" => Sentiment::Positive,
        _ => return None,
    };
    Some((split, label, *file_name))
}

/// Parses one `<id>_<rating>.txt` review file; the error message lacks the location.
fn parse_review_file(label: Sentiment, file_name: &str, bytes: &[u8]) -> Result<Review, String> {
    let bad_name = || format!("expected a file name `<id>_<rating>.txt`, found {file_name:?}");
    let stem = file_name.strip_suffix(".txt").ok_or_else(bad_name)?;
    let (number, rating) = stem.split_once('_').ok_or_else(bad_name)?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_name());
    }
    let rating = parse_rating(rating)?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    if text.trim().is_empty() {
        return Err("empty review".into());
    }
    Ok(Review {
        id: stem.to_string(),
        text: text.to_string(),
        label,
        rating: Some(rating),
    })
}

/// Parses a 1–10 star rating.
fn parse_rating(text: &str) -> Result<u8, String> {
    match text.parse::<u8>() {
        Ok(rating @ 1..=10) => Ok(rating),
        Ok(rating) => Err(format!("rating {rating} is outside 1-10")),
        Err(_) => Err(format!("rating {text:?} is not a number")),
    }
}

/// The rating at the end of a Kaggle id `<file id>_<rating>`; `None` for ids without `_`.
fn rating_from_id(id: &str) -> Result<Option<u8>, String> {
    match id.rsplit_once('_') {
        Some((_, rating)) => parse_rating(rating).map(Some),
        None => Ok(None),
    }
}

/// Removes the double quotes around a field that has no escapes (the Kaggle id).
fn unquote_plain(field: &str) -> Result<&str, String> {
    match field.strip_prefix('"') {
        Some(body) => body
            .strip_suffix('"')
            .ok_or_else(|| "unterminated quote".to_string()),
        None => Ok(field),
    }
}

/// Removes the double quotes around a Kaggle review and undoes its `\"` and `\\` escapes.
fn unquote_escaped(field: &str) -> Result<String, String> {
    let body = field
        .strip_prefix('"')
        .ok_or_else(|| "expected the review to start with a double quote".to_string())?;
    let mut out = String::with_capacity(body.len());
    let mut chars = body.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, escaped @ ('"' | '\\'))) => out.push(escaped),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => return Err("unterminated quote (the field ends in a backslash)".into()),
            },
            '"' if at + 1 == body.len() => return Ok(out),
            '"' => return Err(format!("unescaped quote at byte {} of the field", at + 1)),
            _ => out.push(c),
        }
    }
    Err("unterminated quote: no closing `\"`".into())
}

/// The line and field index of a CSV quoted field that is still open at the end of `data`.
fn find_unterminated_quote(data: &[u8]) -> Option<(u64, usize)> {
    let (mut line, mut field, mut at_field_start) = (1u64, 0usize, true);
    let mut open: Option<(u64, usize)> = None;
    let mut i = 0;
    while i < data.len() {
        let byte = data[i];
        if open.is_some() {
            if byte == b'"' {
                if data.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    open = None;
                }
            } else if byte == b'\n' {
                line += 1;
            }
        } else {
            at_field_start = match byte {
                b'"' if at_field_start => {
                    open = Some((line, field));
                    false
                }
                b',' => {
                    field += 1;
                    true
                }
                b'\n' => {
                    line += 1;
                    field = 0;
                    true
                }
                _ => false,
            };
        }
        i += 1;
    }
    open
}

/// A csv crate error as an [`Error::Parse`] with the line where it happened.
fn csv_error(path: &Path, error: csv::Error) -> Error {
    let line = error.position().map_or(0, csv::Position::line);
    Error::Parse {
        path: path.into(),
        line,
        field: "record".into(),
        message: error.to_string(),
    }
}

/// Sorts reviews by label and numeric file id and splits them into a [`Corpus`].
fn into_corpus(path: &Path, mut found: Vec<(Split, Review)>) -> Result<Corpus> {
    if found.is_empty() {
        return Err(Error::Format {
            path: PathBuf::from(path),
            message: "no review files found under {train,test}/{pos,neg}/".into(),
        });
    }
    let numeric_id = |r: &Review| -> u64 {
        r.id.split('_')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    found.sort_by_cached_key(|(split, r)| (*split, r.label, numeric_id(r)));
    let mut corpus = Corpus::default();
    for (split, review) in found {
        match split {
            Split::Train => corpus.train.push(review),
            Split::Test => corpus.test.push(review),
        }
    }
    Ok(corpus)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/imdb");

    fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }

    /// Asserts that `result` failed with a message naming `path` and every one of `needles`.
    fn assert_err_mentions<T: std::fmt::Debug>(result: Result<T>, path: &Path, needles: &[&str]) {
        let message = result.expect_err("malformed input must fail").to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        for needle in needles {
            assert!(
                message.contains(needle),
                "`{needle}` missing from: {message}"
            );
        }
    }

    #[test]
    fn kaggle_tsv_with_bom_crlf_and_escapes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tsv = "\u{feff}id\tsentiment\treview\r\n\
                   \"12_8\"\t1\t\"He said \\\"wow\\\".<br /><br />A back\\\\slash.\"\r\n\
                   \"7_2\"\t0\t\"Dull.\"\r\n\r\n";
        let path = write_file(dir.path(), "labeled.tsv", tsv.as_bytes());
        let corpus = read_any(&path).expect("valid TSV");
        assert!(corpus.test.is_empty());
        assert_eq!(
            corpus.train,
            vec![
                Review {
                    id: "12_8".into(),
                    text: "He said \"wow\".<br /><br />A back\\slash.".into(),
                    label: Sentiment::Positive,
                    rating: Some(8),
                },
                Review {
                    id: "7_2".into(),
                    text: "Dull.".into(),
                    label: Sentiment::Negative,
                    rating: Some(2),
                },
            ]
        );
        assert_eq!(
            crate::clean_review(&corpus.train[0].text),
            "He said \"wow\".\n\nA back\\slash."
        );
    }

    #[test]
    fn malformed_tsv_names_file_line_and_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let header = "id\tsentiment\treview\n\"1_9\"\t1\t\"fine\"\n";
        let cases: [(&[u8], &[&str]); 7] = [
            (b"\"2_3\"\t0\n", &[":3:", "record", "found 2"]),
            (b"\"2_3\"\t2\t\"x\"\n", &[":3:", "sentiment", "\"2\""]),
            (
                b"\"2_3\"\t0\t\"never closed\n",
                &[":3:", "review", "unterminated"],
            ),
            (
                b"\"2_3\"\t0\t\"a \"bare\" quote\"\n",
                &[":3:", "review", "unescaped quote"],
            ),
            (b"\"2_11\"\t1\t\"x\"\n", &[":3:", "id", "outside 1-10"]),
            (b"\"2_3\"\t0\t\"caf\xe9\"\n", &[":3:", "review", "UTF-8"]),
            (b"\"2_3\t0\t\"x\"\n", &[":3:", "id", "unterminated"]),
        ];
        for (i, (line, needles)) in cases.iter().enumerate() {
            let path = write_file(
                dir.path(),
                &format!("bad{i}.tsv"),
                &[header.as_bytes(), line].concat(),
            );
            assert_err_mentions(read_kaggle_tsv(&path), &path, needles);
        }
        let path = write_file(dir.path(), "noheader.tsv", b"\"1_9\"\t1\t\"fine\"\n");
        assert_err_mentions(read_kaggle_tsv(&path), &path, &[":1:", "header"]);
        let path = write_file(dir.path(), "empty.tsv", b"\xEF\xBB\xBF");
        assert_err_mentions(read_kaggle_tsv(&path), &path, &["empty file"]);
    }

    #[test]
    fn csv_with_quoting_bom_and_crlf() {
        let dir = tempfile::tempdir().expect("temp dir");
        let csv = "\u{feff}review,sentiment\r\n\
                   \"Loved it, truly.<br />Twice \"\"great\"\".\",positive\r\n\
                   \"Two\r\nlines\",Negative\r\n\
                   plain,negative\r\n";
        let path = write_file(dir.path(), "IMDB Dataset.csv", csv.as_bytes());
        let corpus = read_any(&path).expect("valid CSV");
        let got: Vec<(&str, &str, Sentiment)> = corpus
            .train
            .iter()
            .map(|r| (r.id.as_str(), r.text.as_str(), r.label))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "0",
                    "Loved it, truly.<br />Twice \"great\".",
                    Sentiment::Positive
                ),
                ("1", "Two\r\nlines", Sentiment::Negative),
                ("2", "plain", Sentiment::Negative),
            ]
        );
        assert!(corpus.train.iter().all(|r| r.rating.is_none()));
    }

    #[test]
    fn malformed_csv_names_file_line_and_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let header = "review,sentiment\n\"multi\nline\",positive\n";
        let cases: [(&str, &[&str]); 4] = [
            ("ok,neutral\n", &[":4:", "sentiment", "neutral"]),
            ("a,positive,extra\n", &[":4:", "record", "found 3"]),
            (
                "\"never closed,positive\nmore,negative\n",
                &[":4:", "review", "unterminated"],
            ),
            ("lonely\n", &[":4:", "record", "found 1"]),
        ];
        for (i, (line, needles)) in cases.iter().enumerate() {
            let path = write_file(
                dir.path(),
                &format!("bad{i}.csv"),
                format!("{header}{line}").as_bytes(),
            );
            assert_err_mentions(read_csv(&path), &path, needles);
        }
        let path = write_file(dir.path(), "cols.csv", b"text,label\nx,positive\n");
        assert_err_mentions(read_csv(&path), &path, &[":1:", "review", "missing column"]);
        let path = write_file(
            dir.path(),
            "utf8.csv",
            b"review,sentiment\ncaf\xe9,positive\n",
        );
        assert_err_mentions(read_csv(&path), &path, &[":2:", "review", "UTF-8"]);
        let path = write_file(dir.path(), "empty.csv", b"");
        assert_err_mentions(read_csv(&path), &path, &["empty file"]);
    }

    /// A small aclImdb layout: review files plus entries the readers must skip.
    const TINY_ACLIMDB: [(&str, &str); 7] = [
        ("aclImdb/train/pos/10_9.txt", "Great.<br /><br />Really."),
        ("aclImdb/train/pos/2_7.txt", "Good."),
        ("aclImdb/train/neg/0_1.txt", "Awful."),
        ("aclImdb/test/pos/0_10.txt", "Superb."),
        ("aclImdb/test/neg/4_4.txt", "Meh."),
        ("aclImdb/train/unsup/0_0.txt", "skipped"),
        ("aclImdb/imdb.vocab", "the\nand\n"),
    ];

    fn write_tar_gz(path: &Path, files: &[(&str, &[u8])]) {
        let file = File::create(path).expect("create archive");
        let mut builder = tar::Builder::new(GzEncoder::new(file, Compression::fast()));
        for (name, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, *bytes)
                .expect("append");
        }
        builder
            .into_inner()
            .expect("finish tar")
            .finish()
            .expect("finish gzip")
            .flush()
            .expect("flush");
    }

    fn tiny_files() -> Vec<(&'static str, &'static [u8])> {
        TINY_ACLIMDB
            .iter()
            .map(|(n, t)| (*n, t.as_bytes()))
            .collect()
    }

    #[test]
    fn archive_and_folder_read_the_same_corpus() {
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = dir.path().join("tiny.tar.gz");
        write_tar_gz(&archive, &tiny_files());
        let from_archive = read_any(&archive).expect("valid archive");

        let ids = |reviews: &[Review]| reviews.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&from_archive.train), ["0_1", "2_7", "10_9"]);
        assert_eq!(ids(&from_archive.test), ["4_4", "0_10"]);
        assert_eq!(from_archive.train[2].text, "Great.<br /><br />Really.");
        assert_eq!(from_archive.train[2].rating, Some(9));
        assert_eq!(from_archive.test[0].label, Sentiment::Negative);

        let extracted = dir.path().join("extracted");
        for (name, text) in TINY_ACLIMDB {
            let path = extracted.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        assert_eq!(read_any(&extracted).expect("parent folder"), from_archive);
        assert_eq!(
            read_aclimdb_dir(extracted.join("aclImdb")).expect("folder"),
            from_archive
        );
    }

    #[test]
    fn malformed_archive_entries_are_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cases: [(&str, &[u8], &[&str]); 4] = [
            (
                "aclImdb/train/pos/abc.txt",
                b"text",
                &["abc.txt", "<id>_<rating>.txt"],
            ),
            (
                "aclImdb/test/neg/3_11.txt",
                b"text",
                &["3_11.txt", "outside 1-10"],
            ),
            (
                "aclImdb/train/neg/3_2.txt",
                b"caf\xe9",
                &["3_2.txt", "UTF-8"],
            ),
            (
                "aclImdb/train/neg/3_2.txt",
                b"",
                &["3_2.txt", "empty review"],
            ),
        ];
        for (i, (name, bytes, needles)) in cases.iter().enumerate() {
            let mut files = tiny_files();
            files.push((name, bytes));
            let archive = dir.path().join(format!("bad{i}.tar.gz"));
            write_tar_gz(&archive, &files);
            assert_err_mentions(read_aclimdb_archive(&archive), &archive, needles);
        }
        let not_gzip = write_file(dir.path(), "plain.tar.gz", b"not a gzip stream");
        assert_err_mentions(read_aclimdb_archive(&not_gzip), &not_gzip, &[]);
        let empty_dir = tempfile::tempdir().expect("temp dir");
        assert_err_mentions(
            read_aclimdb_dir(empty_dir.path()),
            empty_dir.path(),
            &["no review"],
        );
        let unknown = write_file(dir.path(), "reviews.json", b"{}");
        assert_err_mentions(read_any(&unknown), &unknown, &["layout"]);
    }

    #[test]
    fn shared_kaggle_tsv_head() {
        let data =
            std::fs::read(Path::new(SHARED).join("labeledTrainData.tsv")).expect("shared TSV");
        let head: Vec<&[u8]> = data.split(|&b| b == b'\n').take(301).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_file(dir.path(), "head.tsv", &head.join(&b'\n'));
        let corpus = read_kaggle_tsv(&path).expect("shared TSV head");
        assert_eq!(corpus.train.len(), 300);
        for review in &corpus.train {
            let rating = review.rating.expect("Kaggle ids carry the rating");
            let expected = if rating >= 7 {
                Sentiment::Positive
            } else {
                Sentiment::Negative
            };
            assert_eq!(review.label, expected, "{}", review.id);
        }
        // The first row, as printed by `head -c 300 labeledTrainData.tsv`.
        let first = &corpus.train[0];
        assert_eq!(
            (first.id.as_str(), first.label),
            ("3568_4", Sentiment::Negative)
        );
        assert!(
            first
                .text
                .starts_with("The truth is that a film based on a Harold Robbins")
        );
        assert!(
            first
                .text
                .contains(" \"The Lonely Lady\" is a pure B picture"),
            "{}",
            first.text
        );
    }

    #[test]
    fn shared_archive_has_the_published_counts() {
        let corpus = read_aclimdb_archive(Path::new(SHARED).join("aclImdb_v1.tar.gz"))
            .expect("shared archive");
        for reviews in [&corpus.train, &corpus.test] {
            assert_eq!(reviews.len(), 25_000);
            let positive = reviews
                .iter()
                .filter(|r| r.label == Sentiment::Positive)
                .count();
            assert_eq!(positive, 12_500);
            assert!(reviews.iter().all(|r| match (r.label, r.rating) {
                (Sentiment::Positive, Some(rating)) => rating >= 7,
                (Sentiment::Negative, Some(rating)) => rating <= 4,
                _ => false,
            }));
        }
    }
}
