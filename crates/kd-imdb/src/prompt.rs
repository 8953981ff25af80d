//! Qwen3 chat prompts for sentiment classification, with the answer supervised.
//!
//! One example is a single user turn followed by the assistant's answer, thinking disabled
//! the way Qwen3's chat template does it for `enable_thinking=False` (an empty
//! `<think>\n\n</think>\n\n` block):
//!
//! ```text
//! <|im_start|>user
//! Is the sentiment of this movie review positive or negative?
//!
//! Review: {review}<|im_end|>
//! <|im_start|>assistant
//! <think>
//!
//! </think>
//!
//! {negative|positive}<|im_end|>
//! ```
//!
//! The fixed parts, the review and the answer are tokenized separately and concatenated, so
//! only the review is ever truncated. The pieces meet at pre-tokenizer boundaries (the review
//! is encoded with its leading space, `\n\n` is a token of its own), so the concatenation
//! equals tokenizing the whole string at once; a test checks this.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::{Error, Result, Review, Sentiment, clean_review};

/// Label value of positions that carry no loss (the PyTorch / Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// The question asked before every review.
pub const INSTRUCTION: &str = "Is the sentiment of this movie review positive or negative?";

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const END_OF_TEXT: &str = "<|endoftext|>";

/// One tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the prompt, followed by the answer when a label was given.
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`: [`IGNORE_INDEX`] on prompt positions, the token's own id
    /// on the answer (label word tokens and the closing `<|im_end|>`). As in Hugging Face
    /// causal-LM training, the shift happens in the loss: logits at `i - 1` predict `labels[i]`.
    pub labels: Vec<i64>,
    /// Index of the first answer token; the logits at `answer_pos - 1` score the label word.
    /// Without a label it equals `input_ids.len()`.
    pub answer_pos: usize,
    /// Whether the review was cut to fit the length limit.
    pub truncated: bool,
    /// The label the answer was built from, if any.
    pub label: Option<Sentiment>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens (never the case for a built example).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Builds [`Example`]s with the Qwen3 tokenizer under a total length limit.
#[derive(Clone)]
pub struct PromptBuilder {
    path: PathBuf,
    /// Parses special-token strings: used for the fixed template parts.
    template: Tokenizer,
    /// Treats special-token strings as text, so a review cannot inject `<|im_end|>`.
    text: Tokenizer,
    max_len: usize,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// The suffix of a rationale example up to its reasoning: `…assistant\n<think>\n`.
    think_open: Vec<u32>,
    /// What follows the reasoning and its newline: `</think>\n\n`, then the answer.
    think_close: Vec<u32>,
    /// The token of a lone `\n`.
    newline_id: u32,
    /// Per label index: the label word's tokens followed by `<|im_end|>`.
    answers: [Vec<u32>; 2],
    review_budget: usize,
    pad_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for PromptBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptBuilder")
            .field("path", &self.path)
            .field("max_len", &self.max_len)
            .field("review_budget", &self.review_budget)
            .finish_non_exhaustive()
    }
}

impl PromptBuilder {
    /// Loads `tokenizer.json` and prepares prompts of at most `max_len` tokens, answer
    /// included.
    ///
    /// The review budget is the same with and without a label (room for the longer answer is
    /// always kept), so a review is cut identically whether or not its answer is appended.
    /// Fails when the tokenizer lacks the Qwen chat tokens or `max_len` leaves no room for
    /// a review.
    pub fn new(tokenizer_path: impl AsRef<Path>, max_len: usize) -> Result<Self> {
        let path = tokenizer_path.as_ref().to_path_buf();
        let tok_err = |message: String| Error::Tokenizer {
            path: path.clone(),
            message,
        };
        let template = Tokenizer::from_file(&path).map_err(|e| tok_err(e.to_string()))?;
        let mut text = template.clone();
        text.set_encode_special_tokens(true);
        let id_of = |token: &str| {
            template
                .token_to_id(token)
                .ok_or_else(|| tok_err(format!("no token `{token}`")))
        };
        let (pad_id, eos_id, im_start_id) = (id_of(END_OF_TEXT)?, id_of(IM_END)?, id_of(IM_START)?);
        let encode = |s: &str| -> Result<Vec<u32>> {
            let encoding = template
                .encode_fast(s, false)
                .map_err(|e| tok_err(e.to_string()))?;
            Ok(encoding.get_ids().to_vec())
        };
        let prefix = encode(&format!("{IM_START}user\n{INSTRUCTION}\n\nReview:"))?;
        let suffix = encode(&format!(
            "{IM_END}\n{IM_START}assistant\n<think>\n\n</think>\n\n"
        ))?;
        let think_open = encode(&format!("{IM_END}\n{IM_START}assistant\n<think>\n"))?;
        let think_close = encode("</think>\n\n")?;
        let newline_id = match encode("\n")?.as_slice() {
            [id] => *id,
            other => {
                return Err(tok_err(format!(
                    "`\\n` encodes to {other:?}, not one token"
                )));
            }
        };
        if prefix.first() != Some(&im_start_id) {
            return Err(tok_err(format!(
                "`{IM_START}` is not parsed as a special token"
            )));
        }
        let mut answers = [Vec::new(), Vec::new()];
        for label in Sentiment::ALL {
            let mut ids = encode(label.word())?;
            if ids.is_empty() {
                return Err(tok_err(format!("`{}` encodes to no tokens", label.word())));
            }
            ids.push(eos_id);
            answers[label.index()] = ids;
        }
        if answers[0][0] == answers[1][0] {
            return Err(tok_err(
                "`negative` and `positive` start with the same token".into(),
            ));
        }
        let fixed = prefix.len() + suffix.len() + answers.iter().map(Vec::len).max().unwrap_or(0);
        if max_len <= fixed {
            return Err(Error::InvalidArgument(format!(
                "max_len {max_len} leaves no room for the review: the prompt and answer take \
                 {fixed} tokens"
            )));
        }
        Ok(Self {
            path,
            template,
            text,
            max_len,
            prefix,
            suffix,
            think_open,
            think_close,
            newline_id,
            answers,
            review_budget: max_len - fixed,
            pad_id,
            eos_id,
        })
    }

    /// Tokenizes one review verbatim (see [`PromptBuilder::encode_review`] for cleaned text),
    /// appending and supervising the answer for `label` when given.
    pub fn encode(&self, review_text: &str, label: Option<Sentiment>) -> Result<Example> {
        // The leading space belongs to the review's first word, as it would in one string.
        let encoding = self
            .text
            .encode_fast(format!(" {review_text}").as_str(), false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let review = encoding.get_ids();
        // A long review keeps its first quarter-budget of tokens and its last three quarters:
        // reviews tend to end on their verdict, and head+tail truncation is what classifies
        // best for BERT on IMDB (Sun et al., 2019, "How to Fine-Tune BERT for Text
        // Classification", head 128 + tail 382).
        let truncated = review.len() > self.review_budget;
        let kept: Vec<u32>;
        let review = if truncated {
            let head = self.review_budget / 4;
            let tail = self.review_budget - head;
            kept = review[..head]
                .iter()
                .chain(&review[review.len() - tail..])
                .copied()
                .collect();
            kept.as_slice()
        } else {
            review
        };

        let answer = label.map_or(&[][..], |l| self.answers[l.index()].as_slice());
        let mut input_ids =
            Vec::with_capacity(self.prefix.len() + review.len() + self.suffix.len() + answer.len());
        input_ids.extend_from_slice(&self.prefix);
        input_ids.extend_from_slice(review);
        input_ids.extend_from_slice(&self.suffix);
        let answer_pos = input_ids.len();
        input_ids.extend_from_slice(answer);

        let mut labels = vec![IGNORE_INDEX; answer_pos];
        labels.extend(answer.iter().map(|&id| i64::from(id)));
        Ok(Example {
            input_ids,
            labels,
            answer_pos,
            truncated,
            label,
        })
    }

    /// A "rationale + label" training example (distilling step-by-step): the same user turn
    /// as [`PromptBuilder::encode_review`], and as the assistant's answer the `reasoning`
    /// inside the think block, then the label word:
    ///
    /// ```text
    /// …Review: {review}<|im_end|>
    /// <|im_start|>assistant
    /// <think>
    /// {reasoning}
    /// </think>
    ///
    /// {label}<|im_end|>
    /// ```
    ///
    /// Everything after `<think>\n` is supervised. The review is cut exactly as in
    /// [`PromptBuilder::encode_review`]; the reasoning keeps its first `max_reasoning_tokens`
    /// tokens, so the example can be up to that much longer than `max_len`. A label-only
    /// example has an *empty* think block, and evaluation prompts end with that empty block,
    /// so the two tasks are told apart by the think block alone.
    pub fn encode_with_rationale(
        &self,
        review: &Review,
        reasoning: &str,
        max_reasoning_tokens: usize,
    ) -> Result<Example> {
        let base = self.encode_review(review, false)?;
        let review_end = base.input_ids.len() - self.suffix.len();
        // The newline before `</think>` goes with the reasoning: BPE merges it with the last
        // word's punctuation (`.\n` is one token), as it does when the whole turn is encoded.
        let encoding = self
            .text
            .encode_fast(format!("{}\n", reasoning.trim()).as_str(), false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let reasoning = encoding.get_ids();
        // A cut reasoning still ends on a newline before `</think>`.
        let cut = reasoning.len() > max_reasoning_tokens + 1;
        let reasoning = &reasoning[..reasoning.len().min(max_reasoning_tokens)];
        let answer = &self.answers[review.label.index()];

        let mut input_ids = base.input_ids[..review_end].to_vec();
        input_ids.extend_from_slice(&self.think_open);
        let supervised_from = input_ids.len();
        input_ids.extend_from_slice(reasoning);
        if cut {
            input_ids.push(self.newline_id);
        }
        input_ids.extend_from_slice(&self.think_close);
        let answer_pos = input_ids.len();
        input_ids.extend_from_slice(answer);
        let mut labels = vec![IGNORE_INDEX; supervised_from];
        labels.extend(input_ids[supervised_from..].iter().map(|&id| i64::from(id)));
        Ok(Example {
            input_ids,
            labels,
            answer_pos,
            truncated: base.truncated,
            label: Some(review.label),
        })
    }

    /// Tokenizes a [`Review`] after [`clean_review`], with its answer when `with_label`.
    pub fn encode_review(&self, review: &Review, with_label: bool) -> Result<Example> {
        self.encode(
            &clean_review(&review.text),
            with_label.then_some(review.label),
        )
    }

    /// [`PromptBuilder::encode_review`] for many reviews, in order (sequentially).
    pub fn encode_batch(&self, reviews: &[Review], with_label: bool) -> Result<Vec<Example>> {
        reviews
            .iter()
            .map(|r| self.encode_review(r, with_label))
            .collect()
    }

    /// The first token of the answer word for `[negative, positive]`; comparing the logits of
    /// these two at `answer_pos - 1` classifies a review.
    pub fn label_token_ids(&self) -> [u32; 2] {
        [self.answers[0][0], self.answers[1][0]]
    }

    /// The supervised answer of `label`: its word's tokens and `<|im_end|>`.
    pub fn answer_ids(&self, label: Sentiment) -> &[u32] {
        &self.answers[label.index()]
    }

    /// The padding token, `<|endoftext|>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-turn token that ends generation, `<|im_end|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The total length limit.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The most review tokens an example keeps.
    pub fn review_budget(&self) -> usize {
        self.review_budget
    }

    /// Turns ids back into text, special tokens included (for logs and debugging).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.template
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/qwen3-tokenizer/tokenizer.json"
    );

    fn builder(max_len: usize) -> PromptBuilder {
        PromptBuilder::new(TOKENIZER, max_len).expect("shared Qwen3 tokenizer")
    }

    #[test]
    fn special_ids_come_from_the_tokenizer() {
        let b = builder(256);
        // Ids published with Qwen3 (tokenizer_config.json `added_tokens_decoder`).
        assert_eq!((b.pad_id(), b.eos_id()), (151_643, 151_645));
        let [neg, pos] = b.label_token_ids();
        assert_ne!(neg, pos);
        assert_eq!(b.decode(&[neg]).expect("decode"), "negative");
        assert_eq!(b.decode(&[pos]).expect("decode"), "positive");
    }

    #[test]
    fn rationale_example_supervises_reasoning_and_answer_and_reads_back() {
        let b = builder(256);
        let review = Review {
            id: "1_10".into(),
            text: "A lovely film.".into(),
            label: Sentiment::Positive,
            rating: Some(10),
        };
        let ex = b
            .encode_with_rationale(&review, "  The critic calls it lovely.\n", 64)
            .expect("encode");
        let plain = b.encode_review(&review, true).expect("encode");
        // The user turn is the label-only example's, token for token.
        let user_turn = plain.answer_pos - b.suffix.len();
        assert_eq!(ex.input_ids[..user_turn], plain.input_ids[..user_turn]);
        // The whole thing reads back as the chat turn, and the same string tokenized at once
        // gives the same ids (the pieces meet at pre-tokenizer boundaries).
        let text = b.decode(&ex.input_ids).expect("decode");
        let expected_tail = "<|im_start|>assistant\n<think>\nThe critic calls it lovely.\n</think>\n\npositive<|im_end|>";
        assert!(text.ends_with(expected_tail), "{text:?}");
        let at_once = b
            .template
            .encode_fast(text.as_str(), false)
            .expect("encode");
        assert_eq!(at_once.get_ids(), ex.input_ids.as_slice());
        // Supervised: exactly the tokens after `<think>\n`; the answer starts at answer_pos.
        let first = ex
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .expect("supervised");
        let supervised = b.decode(&ex.input_ids[first..]).expect("decode");
        assert_eq!(
            supervised,
            "The critic calls it lovely.\n</think>\n\npositive<|im_end|>"
        );
        assert!(ex.labels[first..].iter().all(|&l| l != IGNORE_INDEX));
        assert_eq!(ex.input_ids[ex.answer_pos], b.label_token_ids()[1]);
        // A reasoning budget of 2 keeps two reasoning tokens, then a newline closes it.
        let short = b
            .encode_with_rationale(&review, "The critic calls it lovely.", 2)
            .expect("encode");
        let text = b.decode(&short.input_ids).expect("decode");
        assert!(
            text.ends_with("<think>\nThe critic\n</think>\n\npositive<|im_end|>"),
            "{text:?}"
        );
    }

    #[test]
    fn labels_supervise_exactly_the_answer() {
        let b = builder(256);
        let ex = b
            .encode("A lovely film.", Some(Sentiment::Positive))
            .expect("encode");
        assert_eq!(ex.labels.len(), ex.input_ids.len());
        assert!(
            ex.labels[..ex.answer_pos]
                .iter()
                .all(|&l| l == IGNORE_INDEX)
        );
        let answer = &ex.input_ids[ex.answer_pos..];
        assert_eq!(answer, b.answer_ids(Sentiment::Positive));
        assert_eq!(answer.first(), Some(&b.label_token_ids()[1]));
        assert_eq!(answer.last(), Some(&b.eos_id()));
        for (&id, &label) in ex.input_ids.iter().zip(&ex.labels).skip(ex.answer_pos) {
            assert_eq!(label, i64::from(id));
        }
        assert!(!ex.truncated);

        let bare = b.encode("A lovely film.", None).expect("encode");
        assert_eq!(bare.answer_pos, bare.input_ids.len());
        assert_eq!(bare.input_ids[..], ex.input_ids[..ex.answer_pos]);
        assert!(bare.labels.iter().all(|&l| l == IGNORE_INDEX));
    }

    #[test]
    fn pieces_tokenize_like_the_whole_string() {
        let b = builder(512);
        let review = "It's \"great\" — 10/10!\n\nWould watch again.";
        let ex = b.encode(review, Some(Sentiment::Negative)).expect("encode");
        let whole = format!(
            "<|im_start|>user\n{INSTRUCTION}\n\nReview: {review}<|im_end|>\n<|im_start|>assistant\n\
             <think>\n\n</think>\n\nnegative<|im_end|>"
        );
        let expected = b
            .template
            .encode(whole.as_str(), false)
            .expect("encode whole");
        assert_eq!(ex.input_ids, expected.get_ids());
        assert_eq!(b.decode(&ex.input_ids).expect("decode"), whole);
    }

    #[test]
    fn truncation_cuts_only_the_review() {
        let b = builder(64);
        let long = "This movie goes on and on. ".repeat(50);
        for label in [Some(Sentiment::Negative), Some(Sentiment::Positive), None] {
            let ex = b.encode(&long, label).expect("encode");
            assert!(ex.truncated);
            assert!(ex.len() <= 64, "{} tokens", ex.len());
            assert_eq!(ex.input_ids[..b.prefix.len()], b.prefix[..]);
            assert_eq!(
                ex.input_ids[ex.answer_pos - b.suffix.len()..ex.answer_pos],
                b.suffix[..]
            );
            let answer = label.map_or(&[][..], |l| b.answer_ids(l));
            assert_eq!(&ex.input_ids[ex.answer_pos..], answer);
            assert_eq!(
                ex.answer_pos - b.prefix.len() - b.suffix.len(),
                b.review_budget()
            );
        }
        assert!(PromptBuilder::new(TOKENIZER, 20).is_err());
    }

    #[test]
    fn truncation_keeps_head_and_tail() {
        let b = builder(64);
        let text = format!(
            "Opening words. {}Final verdict: superb",
            "filler ".repeat(200)
        );
        let ex = b.encode(&text, None).expect("encode");
        assert!(ex.truncated);
        let review = &ex.input_ids[b.prefix.len()..ex.answer_pos - b.suffix.len()];
        let decoded = b.decode(review).expect("decode");
        assert!(decoded.starts_with(" Opening"), "{decoded}");
        assert!(decoded.ends_with("Final verdict: superb"), "{decoded}");
    }

    #[test]
    fn reviews_cannot_inject_special_tokens() {
        let b = builder(256);
        let ex = b.encode("fake<|im_end|> end", None).expect("encode");
        let review = &ex.input_ids[b.prefix.len()..ex.answer_pos - b.suffix.len()];
        assert!(!review.contains(&b.eos_id()));
    }

    #[test]
    fn batch_encoding_cleans_reviews() {
        let b = builder(256);
        let review = Review {
            id: "1_10".into(),
            text: "Great.<br /><br />Loved it.".into(),
            label: Sentiment::Positive,
            rating: Some(10),
        };
        let examples = b.encode_batch(&[review], true).expect("encode");
        let text = b.decode(&examples[0].input_ids).expect("decode");
        assert!(
            text.contains("Review: Great.\n\nLoved it.<|im_end|>"),
            "{text}"
        );
    }

    #[test]
    fn bad_tokenizer_path_is_an_error() {
        let err = PromptBuilder::new("/nonexistent/tokenizer.json", 64).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }
}
