//! Chat templates from `tokenizer.chat_template`, rendered with minijinja.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::{Tokenizer, TokenizerError};

/// One chat message.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, for models that ship no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format, for Gemma vocabularies that ship no template (the
/// base models): a system message joins the first user turn, the assistant
/// is "model". BOS is left to the tokenizer.
pub const GEMMA: &str = "{%- if messages and messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] + '\n\n' -%}{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '' -%}{%- set msgs = messages -%}{%- endif -%}{%- for m in msgs -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

impl Tokenizer {
    /// The template used: the model's own, else the turn format its
    /// vocabulary was built for (Gemma's), else ChatML.
    pub fn chat_template_source(&self) -> &str {
        match self.chat_template.as_deref() {
            Some(t) => t,
            None if self.is_special_text("<start_of_turn>") => GEMMA,
            None => CHATML,
        }
    }

    /// Renders `messages` with the model's chat template (see
    /// [`Tokenizer::chat_template_source`]), ending with the assistant prompt.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, TokenizerError> {
        let source = self.chat_template_source();
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", source).map_err(|e| {
            TokenizerError::Template(format!("cannot parse the model's template: {e}"))
        })?;
        let tmpl = env.get_template("chat").expect("just added");
        let piece = |id: Option<u32>| {
            id.and_then(|i| self.token_text(i))
                .unwrap_or_default()
                .to_string()
        };
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => piece(self.bos),
            eos_token => piece(self.eos),
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
