//! Chat formatting with the model's own template, and which part of a conversation is
//! trained.
//!
//! Hugging Face models ship their chat format as a Jinja template (`tokenizer_config.json`
//! `chat_template`, or GGUF `tokenizer.chat_template`). It is rendered here with minijinja,
//! set up as `transformers` sets up Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! Python string methods such as `.strip()`, and `raise_exception`), with the variables
//! `messages`, `bos_token`, `eos_token` and `add_generation_prompt`. Training on the
//! template the model will be prompted with at inference time is the point: a made-up format
//! would teach the adapter a conversation layout nobody uses.
//!
//! Which text is trained: for each assistant turn `i`, the conversation before it is rendered
//! with `add_generation_prompt = true` (the prompt, as at inference) and the conversation up
//! to and including it without. The full rendering must start with the prompt rendering;
//! exactly the text after the prompt (the reply and whatever the template closes the turn
//! with, such as `<|im_end|>\n`) is trained. Each prompt rendering must in turn start with
//! the previous full rendering, so the pieces concatenate to the whole conversation. A
//! template that rewrites earlier turns (some strip past reasoning, or date-stamp the system
//! prompt) fails this check with an error rather than training on a layout that never occurs.
//!
//! Models without a template use [`ChatTemplate::fallback`], a plain documented format.

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

use super::tokenizer::HfTokenizer;
use crate::error::CorpusError;

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// `system`, `user` or `assistant`, as templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The role named `name`, if it is one of the three.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A piece of a rendered conversation and whether it is trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

/// Name of the one template in a [`ChatTemplate`]'s environment.
const NAME: &str = "chat_template";

/// A model's chat format.
#[derive(Debug)]
pub enum ChatTemplate {
    /// The model's Jinja template.
    Jinja {
        env: Box<Environment<'static>>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    },
    /// The plain format for models without a template:
    ///
    /// ```text
    /// System: {content}
    /// User: {content}
    /// Assistant: {content}{eos_token}
    /// ```
    ///
    /// Messages are joined with `\n`; the generation prompt is `Assistant: ` (after a `\n`
    /// when messages precede it). The end-of-sequence token after every assistant turn (when
    /// the tokenizer has one) teaches the model to stop.
    Fallback { eos_token: Option<String> },
}

/// `raise_exception(message)`: templates call it to refuse a conversation (roles out of
/// order, say). `transformers` defines it; Jinja has no such built-in.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn template_error(context: &str, e: &Error) -> CorpusError {
    let mut reason = format!("{context}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    CorpusError::Template { reason }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. `bos_token` and `eos_token` are the texts templates
    /// see as `bos_token` and `eos_token` (undefined, so rendering as nothing, when `None`).
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, CorpusError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, and Jinja2's default of
        // dropping a single trailing newline, which is also minijinja's.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error("syntax configuration", &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| template_error("does not compile", &e))?;
        Ok(ChatTemplate::Jinja {
            env: Box::new(env),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The plain format (see [`ChatTemplate::Fallback`]).
    pub fn fallback(eos_token: Option<&str>) -> Self {
        ChatTemplate::Fallback {
            eos_token: eos_token.map(str::to_string),
        }
    }

    /// The tokenizer's own template, or the fallback format when it has none.
    pub fn for_tokenizer(tokenizer: &HfTokenizer) -> Result<Self, CorpusError> {
        match tokenizer.chat_template() {
            Some(t) => Self::new(t, tokenizer.bos_token(), tokenizer.eos_token()),
            None => Ok(Self::fallback(tokenizer.eos_token())),
        }
    }

    /// Whether this is the fallback format rather than the model's template.
    pub fn is_fallback(&self) -> bool {
        matches!(self, ChatTemplate::Fallback { .. })
    }

    /// Renders `messages`, followed by the opening of an assistant turn when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, CorpusError> {
        match self {
            ChatTemplate::Jinja {
                env,
                bos_token,
                eos_token,
            } => {
                let messages: Value = messages
                    .iter()
                    .map(|m| {
                        Value::from_object(BTreeMap::from([
                            ("role".to_string(), Value::from(m.role.as_str())),
                            ("content".to_string(), Value::from(m.content.as_str())),
                        ]))
                    })
                    .collect();
                let mut ctx = BTreeMap::from([
                    ("messages".to_string(), messages),
                    (
                        "add_generation_prompt".to_string(),
                        Value::from(add_generation_prompt),
                    ),
                ]);
                if let Some(b) = bos_token {
                    ctx.insert("bos_token".to_string(), Value::from(b.as_str()));
                }
                if let Some(e) = eos_token {
                    ctx.insert("eos_token".to_string(), Value::from(e.as_str()));
                }
                env.get_template(NAME)
                    .and_then(|t| t.render(Value::from_object(ctx)))
                    .map_err(|e| template_error("cannot render the conversation", &e))
            }
            ChatTemplate::Fallback { eos_token } => {
                let eos = eos_token.as_deref().unwrap_or("");
                let mut parts: Vec<String> = messages
                    .iter()
                    .map(|m| match m.role {
                        Role::System => format!("System: {}", m.content),
                        Role::User => format!("User: {}", m.content),
                        Role::Assistant => format!("Assistant: {}{eos}", m.content),
                    })
                    .collect();
                if add_generation_prompt {
                    parts.push("Assistant: ".to_string());
                }
                Ok(parts.join("\n"))
            }
        }
    }

    /// Splits the rendering of `messages` into untrained and trained pieces (see the
    /// [module documentation](self)). Their texts concatenate to `render(messages, false)`.
    /// Fails when there is no assistant message or the template is not prefix-consistent.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<Segment>, CorpusError> {
        let mut segments = Vec::new();
        let mut push = |text: &str, trained: bool| {
            if !text.is_empty() {
                segments.push(Segment {
                    text: text.to_string(),
                    trained,
                });
            }
        };
        let mut done = String::new();
        let mut assistant_turns = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            assistant_turns += 1;
            let prompt = self.render(&messages[..i], true)?;
            let full = self.render(&messages[..=i], false)?;
            let Some(context) = prompt.strip_prefix(done.as_str()) else {
                return Err(CorpusError::Template {
                    reason: format!(
                        "the prompt of message {i} (the {i} messages before it with \
                         add_generation_prompt) does not start with the rendering of the \
                         conversation up to the previous assistant message: the template \
                         rewrites earlier turns"
                    ),
                });
            };
            let Some(reply) = full.strip_prefix(prompt.as_str()) else {
                return Err(CorpusError::Template {
                    reason: format!(
                        "the conversation up to message {i} (assistant) does not start with \
                         the rendering of its prompt (add_generation_prompt = true), so the \
                         reply cannot be told from the prompt"
                    ),
                });
            };
            push(context, false);
            push(reply, true);
            done = full;
        }
        if assistant_turns == 0 {
            return Err(CorpusError::Template {
                reason: "the conversation has no assistant message: nothing to train on".into(),
            });
        }
        let whole = self.render(messages, false)?;
        let Some(tail) = whole.strip_prefix(done.as_str()) else {
            return Err(CorpusError::Template {
                reason: "the whole conversation does not start with its rendering up to the \
                         last assistant message"
                    .into(),
            });
        };
        push(tail, false);
        Ok(segments)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SmolLM2-Instruct's chat template, verbatim (ChatML with a default system prompt).
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's template, with `.strip()` where Meta's uses `| trim`, a `raise_exception`
    /// guard against a conversation that opens with the assistant, and written over several
    /// lines so that `trim_blocks`/`lstrip_blocks` matter (checked against Jinja2 set up as
    /// transformers sets it up).
    pub(crate) const LLAMA3: &str = r"{% if messages[0]['role'] == 'assistant' %}
    {{ raise_exception('Conversations must not start with the assistant') }}
{% endif %}
{% set loop_messages = messages %}
{% for message in loop_messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + '<|eot_id|>' %}
    {% if loop.index0 == 0 %}
        {% set content = bos_token + content %}
    {% endif %}
{{ content }}{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, Some("<|im_start|>"), Some("<|im_end|>")).unwrap()
    }

    fn llama3() -> ChatTemplate {
        ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap()
    }

    fn exchange() -> Vec<Message> {
        vec![
            Message::new(Role::User, "What is 2+2?"),
            Message::new(Role::Assistant, "4"),
        ]
    }

    /// The exact strings transformers' `apply_chat_template` produces for SmolLM2.
    #[test]
    fn smollm2_template_renders_exactly() {
        let t = smollm2();
        assert_eq!(
            t.render(&exchange(), false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n"
        );
        assert_eq!(
            t.render(&exchange()[..1], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // A system message of its own replaces the default one.
        let with_system = [
            Message::new(Role::System, "Answer in Lao."),
            Message::new(Role::User, "hi"),
        ];
        assert_eq!(
            t.render(&with_system, true).unwrap(),
            "<|im_start|>system\nAnswer in Lao.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_template_uses_bos_and_strip() {
        let t = llama3();
        let messages = [
            Message::new(Role::System, "  Be brief. "),
            Message::new(Role::User, "What is 2+2?\n"),
            Message::new(Role::Assistant, " 4 "),
        ];
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        );
        let segments = t.segments(&messages).unwrap();
        assert_eq!(
            segments,
            [
                Segment {
                    text: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
                           <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
                           <|start_header_id|>assistant<|end_header_id|>\n\n"
                        .into(),
                    trained: false
                },
                Segment {
                    text: "4<|eot_id|>".into(),
                    trained: true
                },
            ]
        );
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let err = llama3()
            .render(&[Message::new(Role::Assistant, "hi")], false)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("chat template: cannot render")
                && msg.contains("Conversations must not start with the assistant"),
            "{msg}"
        );
    }

    #[test]
    fn multi_turn_trains_every_assistant_turn_and_nothing_else() {
        let t = smollm2();
        let messages = [
            Message::new(Role::User, "a"),
            Message::new(Role::Assistant, "b"),
            Message::new(Role::User, "c"),
            Message::new(Role::Assistant, "d"),
        ];
        let segments = t.segments(&messages).unwrap();
        let trained: Vec<&str> = segments
            .iter()
            .filter(|s| s.trained)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trained, ["b<|im_end|>\n", "d<|im_end|>\n"]);
        assert_eq!(segments.len(), 4);
        assert_eq!(
            segments[2].text,
            "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
        );
        let joined: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, t.render(&messages, false).unwrap());
    }

    #[test]
    fn a_template_that_rewrites_its_prompt_is_refused() {
        // The generation prompt differs from how the assistant turn is rendered.
        let t = ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[bot] {% endif %}",
            None,
            None,
        )
        .unwrap();
        let err = t.segments(&exchange()).unwrap_err();
        assert!(err.to_string().contains("does not start with"), "{err}");
    }

    #[test]
    fn template_errors_are_reported() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
        let err = smollm2()
            .segments(&[Message::new(Role::User, "q")])
            .unwrap_err();
        assert!(err.to_string().contains("no assistant message"), "{err}");
    }

    #[test]
    fn fallback_format_is_plain_and_prefix_consistent() {
        let t = ChatTemplate::fallback(Some("</s>"));
        assert!(t.is_fallback());
        let mut messages = vec![Message::new(Role::System, "s")];
        messages.extend(exchange());
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "System: s\nUser: What is 2+2?\nAssistant: 4</s>"
        );
        assert_eq!(
            t.render(&messages[..2], true).unwrap(),
            "System: s\nUser: What is 2+2?\nAssistant: "
        );
        let segments = t.segments(&messages).unwrap();
        assert_eq!(
            segments[1],
            Segment {
                text: "4</s>".into(),
                trained: true
            }
        );
        assert_eq!(segments.len(), 2);
        assert_eq!(
            ChatTemplate::fallback(None)
                .render(&exchange(), false)
                .unwrap(),
            "User: What is 2+2?\nAssistant: 4"
        );
    }
}
