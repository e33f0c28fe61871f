//! Chat templates from `tokenizer.chat_template`, rendered with minijinja.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::{Tokenizer, TokenizerError};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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

impl Tokenizer {
    /// Renders `messages` with the model's chat template (ChatML when the
    /// model has none), ending with the assistant prompt.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, TokenizerError> {
        let source = self.chat_template.as_deref().unwrap_or(CHATML);
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
