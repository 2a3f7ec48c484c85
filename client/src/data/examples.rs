//! Training examples: token ids with a per-token loss mask.
//!
//! - A plain-text document (a `.txt` file's training lines, a JSONL `text` record) is one
//!   example, trained on entirely. It is encoded as the model's tokenizer encodes a document
//!   ([`TextTokenizer::try_encode_document`]: with BOS where the model's post-processor adds
//!   one) and ends with the end-of-sequence token, so the model learns where documents end.
//! - A prompt/response or `messages` record is one example rendered with the chat template
//!   ([`ChatTemplate::segments`]); only the assistant replies are trained. Each piece is
//!   tokenized on its own, without added special tokens (the template writes the ones it
//!   wants, such as Llama 3's `bos_token`), so the prompt's tokens are exactly those the model
//!   is given at inference. The example ends with the end-of-sequence token, trained, unless
//!   the last reply already contains it (ChatML closes a turn with `<|im_end|>`, which is
//!   SmolLM2-Instruct's eos).

use super::chat::{ChatTemplate, Message, Role};
use super::jsonl::Record;
use super::tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
use crate::error::CorpusError;

/// The unit of training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// `loss_mask[i]`: whether *predicting* `tokens[i]` from the tokens before it counts in
    /// the loss. `loss_mask[0]` is never used: nothing precedes the first token.
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// An example trained on entirely.
    pub fn all_trained(tokens: Vec<u32>) -> Self {
        let loss_mask = vec![true; tokens.len()];
        Example { tokens, loss_mask }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of predictions that count in the loss (`loss_mask[1..]` set): this example's
    /// share of the sample weight.
    pub fn trained_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }

    fn push(&mut self, tokens: &[u32], trained: bool) {
        self.tokens.extend_from_slice(tokens);
        self.loss_mask
            .extend(std::iter::repeat_n(trained, tokens.len()));
    }
}

static BYTES: ByteTokenizer = ByteTokenizer;

/// Turns documents and records into [`Example`]s with one tokenizer and chat format.
pub struct ExampleBuilder<'a> {
    tokenizer: &'a dyn TextTokenizer,
    template: ChatTemplate,
}

impl<'a> ExampleBuilder<'a> {
    /// A builder with an explicit chat format.
    pub fn new(tokenizer: &'a dyn TextTokenizer, template: ChatTemplate) -> Self {
        ExampleBuilder {
            tokenizer,
            template,
        }
    }

    /// The model's tokenizer with its own chat template, or the fallback format when it has
    /// none.
    pub fn for_model(tokenizer: &'a HfTokenizer) -> Result<Self, CorpusError> {
        Ok(Self::new(
            tokenizer,
            ChatTemplate::for_tokenizer(tokenizer)?,
        ))
    }

    /// The byte tokenizer with the fallback format (no end-of-sequence token).
    pub fn bytes() -> ExampleBuilder<'static> {
        ExampleBuilder::new(&BYTES, ChatTemplate::fallback(None))
    }

    pub fn tokenizer(&self) -> &'a dyn TextTokenizer {
        self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// A plain-text document, trained on entirely, ending with the end-of-sequence token.
    pub fn document(&self, text: &str) -> Result<Example, CorpusError> {
        let mut tokens = self.tokenizer.try_encode_document(text)?;
        if let Some(eos) = self.tokenizer.eos_id()
            && tokens.last() != Some(&eos)
        {
            tokens.push(eos);
        }
        Ok(Example::all_trained(tokens))
    }

    /// A conversation: only the assistant replies are trained.
    pub fn conversation(&self, messages: &[Message]) -> Result<Example, CorpusError> {
        let mut example = Example {
            tokens: Vec::new(),
            loss_mask: Vec::new(),
        };
        let mut last_reply_has_eos = false;
        for segment in self.template.segments(messages)? {
            let tokens = self.tokenizer.try_encode(&segment.text)?;
            if segment.trained {
                last_reply_has_eos = self
                    .tokenizer
                    .eos_id()
                    .is_some_and(|eos| tokens.contains(&eos));
            }
            example.push(&tokens, segment.trained);
        }
        if let Some(eos) = self.tokenizer.eos_id()
            && !last_reply_has_eos
        {
            example.push(&[eos], true);
        }
        Ok(example)
    }

    /// A prompt and its response: the response is trained.
    pub fn prompt_response(&self, prompt: &str, response: &str) -> Result<Example, CorpusError> {
        self.conversation(&[
            Message::new(Role::User, prompt),
            Message::new(Role::Assistant, response),
        ])
    }

    /// One JSONL record.
    pub fn record(&self, record: &Record) -> Result<Example, CorpusError> {
        match record {
            Record::Text(text) => self.document(text),
            Record::PromptResponse { prompt, response } => self.prompt_response(prompt, response),
            Record::Messages(messages) => self.conversation(messages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::tests::{LLAMA3, SMOLLM2};
    use crate::data::tokenizer::tests::tiny_bpe;

    /// The loss mask is false on every prompt token (system prompt, user turn, the opening of
    /// the assistant turn) and true on exactly the response, its `<|im_end|>` and the newline
    /// the template closes the turn with.
    #[test]
    fn prompt_tokens_contribute_nothing() {
        let tok = tiny_bpe();
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        assert!(!builder.template().is_fallback());
        let ex = builder
            .prompt_response("Article 1: all human beings", "are born free and equal")
            .unwrap();
        let template = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        let prompt_text = template
            .render(
                &[Message::new(Role::User, "Article 1: all human beings")],
                true,
            )
            .unwrap();
        let prompt = tok.try_encode(&prompt_text).unwrap();
        let response = tok.try_encode("are born free and equal").unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let newline = tok.try_encode("\n").unwrap();

        let mut expected = prompt.clone();
        expected.extend(&response);
        expected.push(im_end);
        expected.extend(&newline);
        assert_eq!(ex.tokens, expected);
        assert_eq!(ex.loss_mask.len(), ex.tokens.len());
        assert!(ex.loss_mask[..prompt.len()].iter().all(|&m| !m));
        assert!(ex.loss_mask[prompt.len()..].iter().all(|&m| m));
        assert_eq!(ex.trained_targets(), response.len() + 1 + newline.len());
        // `<|im_end|>` (the eos) is in the trained reply, so no second eos is appended.
        assert_eq!(ex.tokens.iter().filter(|&&t| t == im_end).count(), 3);
        assert_eq!(
            tok.decode(&ex.tokens).unwrap(),
            template
                .render(
                    &[
                        Message::new(Role::User, "Article 1: all human beings"),
                        Message::new(Role::Assistant, "are born free and equal")
                    ],
                    false
                )
                .unwrap()
        );
    }

    /// The real SmolLM2-Instruct: its GGUF carries exactly the ChatML template tested in
    /// `chat`, and a prompt/response example is masked on the prompt and trained on the
    /// reply, its `<|im_end|>` and the closing newline.
    #[test]
    fn smollm2_prompt_tokens_contribute_nothing() {
        let Some(tok) =
            crate::data::tokenizer::tests::smollm2("smollm2_prompt_tokens_contribute_nothing")
        else {
            return;
        };
        assert_eq!(tok.chat_template(), Some(SMOLLM2));
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        let ex = builder
            .prompt_response("Translate to Lao: water", "ນ້ຳ")
            .unwrap();
        let trained: Vec<u32> = ex
            .tokens
            .iter()
            .zip(&ex.loss_mask)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(tok.decode(&trained).unwrap(), "ນ້ຳ<|im_end|>\n");
        let first_trained = ex.loss_mask.iter().position(|&m| m).unwrap();
        assert!(ex.loss_mask[first_trained..].iter().all(|&m| m));
        assert_eq!(
            tok.decode(&ex.tokens[..first_trained]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nTranslate to Lao: water<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// With a template whose turns do not end in the eos token, the eos is appended, trained.
    #[test]
    fn eos_is_appended_when_the_template_does_not_end_the_turn() {
        let tok = tiny_bpe(); // eos is <|im_end|>; the Llama-3 template ends turns with <|eot_id|>
        let builder = ExampleBuilder::new(
            &tok,
            ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|im_end|>")).unwrap(),
        );
        let ex = builder.prompt_response(" Hello ", " world ").unwrap();
        let bos = tok.token_id("<|begin_of_text|>").unwrap();
        let eot = tok.token_id("<|eot_id|>").unwrap();
        assert_eq!(ex.tokens[0], bos);
        assert_eq!(ex.tokens.last(), Some(&tok.eos_id().unwrap()));
        assert!(ex.loss_mask.last().unwrap());
        let world = tok.try_encode("world").unwrap();
        let trained: Vec<u32> = ex
            .tokens
            .iter()
            .zip(&ex.loss_mask)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect();
        let mut expected = world;
        expected.extend([eot, tok.eos_id().unwrap()]);
        assert_eq!(trained, expected);
    }

    #[test]
    fn multi_turn_masks_follow_the_assistant_turns() {
        let tok = tiny_bpe();
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        let ex = builder
            .conversation(&[
                Message::new(Role::System, "s"),
                Message::new(Role::User, "u1"),
                Message::new(Role::Assistant, "a1"),
                Message::new(Role::User, "u2"),
                Message::new(Role::Assistant, "a2"),
            ])
            .unwrap();
        // Decode the trained runs.
        let mut runs = Vec::new();
        let mut current = Vec::new();
        for (&t, &m) in ex.tokens.iter().zip(&ex.loss_mask) {
            if m {
                current.push(t);
            } else if !current.is_empty() {
                runs.push(tok.decode(&std::mem::take(&mut current)).unwrap());
            }
        }
        runs.push(tok.decode(&current).unwrap());
        assert_eq!(runs, ["a1<|im_end|>\n", "a2<|im_end|>\n"]);
    }

    #[test]
    fn documents_are_trained_entirely_and_end_with_eos() {
        let tok = tiny_bpe();
        let builder = ExampleBuilder::for_model(&tok).unwrap();
        let ex = builder.document("Everyone has the right to life.").unwrap();
        let mut expected = tok.try_encode("Everyone has the right to life.").unwrap();
        expected.push(2);
        assert_eq!(ex.tokens, expected);
        assert!(ex.loss_mask.iter().all(|&m| m));

        let bytes = ExampleBuilder::bytes().document("ab").unwrap();
        assert_eq!(bytes, Example::all_trained(vec![97, 98]));
        let chat = ExampleBuilder::bytes().prompt_response("q", "a").unwrap();
        assert_eq!(
            chat.tokens,
            b"User: q\nAssistant: a".map(u32::from).to_vec()
        );
        assert_eq!(chat.trained_targets(), 1);
    }

    /// A document starts the way the model's post-processor starts one (BOS for Llama 3).
    #[test]
    fn documents_get_the_post_processors_bos() {
        use tokenizers::processors::template::TemplateProcessing;
        let mut inner = tiny_bpe().checkpoint_tokenizer().clone();
        inner.tokenizer.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("<|begin_of_text|> $A")
                .unwrap()
                .special_tokens(vec![("<|begin_of_text|>", 3)])
                .build()
                .unwrap(),
        ));
        let tok = HfTokenizer::new(inner).unwrap();
        let ex = ExampleBuilder::for_model(&tok)
            .unwrap()
            .document("hi")
            .unwrap();
        assert_eq!(ex.tokens.first(), Some(&3));
        assert_eq!(ex.tokens.last(), Some(&2));
        // Plain encoding (held-out text, chat pieces) adds nothing.
        assert_ne!(tok.try_encode("hi").unwrap().first(), Some(&3));
    }
}
