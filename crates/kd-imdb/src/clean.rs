//! Turning raw review markup into plain text.

/// Replaces the HTML line breaks of the raw reviews (`<br />`, `<br/>`, `<br>`, any case)
/// by newlines, collapses runs of more than two newlines into two, and trims the result.
pub fn clean_review(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut newlines = 0usize;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (piece, consumed) = match line_break_len(rest) {
            Some(len) => ('\n', len),
            None => (c, c.len_utf8()),
        };
        rest = &rest[consumed..];
        if piece == '\n' {
            newlines += 1;
            if newlines > 2 {
                continue;
            }
        } else {
            newlines = 0;
        }
        out.push(piece);
    }
    out.trim().to_string()
}

/// The byte length of a `<br>` tag (optional spaces and slash) at the start of `s`.
fn line_break_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.len() < 4 || bytes[0] != b'<' || !bytes[1..3].eq_ignore_ascii_case(b"br") {
        return None;
    }
    let mut i = 3;
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    if i < bytes.len() && bytes[i] == b'/' {
        i += 1;
    }
    (i < bytes.len() && bytes[i] == b'>').then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_become_newlines() {
        assert_eq!(clean_review("a<br />b<br/>c<br>d<BR />e"), "a\nb\nc\nd\ne");
        assert_eq!(clean_review("one.<br /><br />Two."), "one.\n\nTwo.");
    }

    #[test]
    fn long_runs_collapse_and_ends_trim() {
        assert_eq!(
            clean_review("  <br />a<br /><br /><br /><br />b\n\n\nc <br />"),
            "a\n\nb\n\nc"
        );
    }

    #[test]
    fn other_tags_and_text_are_kept() {
        assert_eq!(
            clean_review("<b>bold</b> <brx> x<y é"),
            "<b>bold</b> <brx> x<y é"
        );
        assert_eq!(clean_review("<br"), "<br");
    }
}
