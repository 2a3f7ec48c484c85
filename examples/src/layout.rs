//! Federations shaped like deployments: who the labs are and which part of their language's
//! text each one holds.
//!
//! - `one-per-language`: one lab per language holding all of its text, the pilot's first
//!   federation.
//! - `per-country`: three labs per language, a ministry, a university and a hospital, each
//!   holding a disjoint, contiguous (so topically non-IID) shard of the language's training
//!   text, in the proportions 3 : 2 : 1. No lab has enough text to train well alone, which
//!   is the situation a national federation is for.
//!
//! In both, every lab of a language is judged on the same held-out text: the last 10% of the
//! language's lines, which no lab trains on.

use fedclient::data::{LocalCorpus, TextTokenizer};
use serde::Serialize;

use crate::corpus::udhr;

/// Who the labs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    OnePerLanguage,
    PerCountry,
}

impl Layout {
    pub const ALL: [Layout; 2] = [Layout::OnePerLanguage, Layout::PerCountry];

    pub fn name(self) -> &'static str {
        match self {
            Layout::OnePerLanguage => "one-per-language",
            Layout::PerCountry => "per-country",
        }
    }

    pub fn parse(value: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == value)
    }

    /// `(role, share of the language's training text)` of each lab of a language.
    pub fn roles(self) -> &'static [(&'static str, u32)] {
        match self {
            Layout::OnePerLanguage => &[("lab", 1)],
            Layout::PerCountry => &[("ministry", 3), ("university", 2), ("hospital", 1)],
        }
    }

    /// Labs per language.
    pub fn labs_per_language(self) -> usize {
        self.roles().len()
    }

    /// The participant name of the lab with `role` for language `code`: `lab-lo` in
    /// `one-per-language`, `lab-lo-ministry` in `per-country`.
    pub fn lab_name(self, code: &str, role: &str) -> String {
        match self {
            Layout::OnePerLanguage => format!("lab-{code}"),
            Layout::PerCountry => format!("lab-{code}-{role}"),
        }
    }

    /// Every lab of `languages`, language by language, with its shard of the UDHR text
    /// (`heldout_fraction` of each language's lines held out, the same for all its labs).
    pub fn labs(
        self,
        languages: &[String],
        heldout_fraction: f64,
        tokenizer: &dyn TextTokenizer,
    ) -> Result<Vec<LabData>, LayoutError> {
        let shares: Vec<u32> = self.roles().iter().map(|(_, s)| *s).collect();
        let mut out = Vec::new();
        for code in languages {
            let (name, text) =
                udhr(code).ok_or_else(|| LayoutError::UnknownLanguage(code.clone()))?;
            let shards = LocalCorpus::shards(code, text, heldout_fraction, &shares, tokenizer)
                .map_err(|e| LayoutError::Corpus {
                    language: name.to_string(),
                    reason: e.to_string(),
                })?;
            for ((role, _), corpus) in self.roles().iter().zip(shards) {
                out.push(LabData {
                    name: self.lab_name(code, role),
                    role: role.to_string(),
                    language: code.clone(),
                    language_name: name.to_string(),
                    corpus,
                });
            }
        }
        Ok(out)
    }
}

/// One lab and its data.
#[derive(Debug, Clone)]
pub struct LabData {
    /// Participant name.
    pub name: String,
    /// `ministry`, `university`, `hospital`, or `lab`.
    pub role: String,
    /// Language code.
    pub language: String,
    /// English name of the language.
    pub language_name: String,
    pub corpus: LocalCorpus,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("unknown language {0:?}; the UDHR here has lo, km, th, vi, my, id, ms, tl, en")]
    UnknownLanguage(String),
    #[error("preparing the {language} text: {reason}")]
    Corpus { language: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedclient::data::ByteTokenizer;

    #[test]
    fn per_country_gives_three_disjoint_shards_per_language() {
        let langs = vec!["lo".to_string(), "vi".to_string()];
        let labs = Layout::PerCountry
            .labs(&langs, 0.1, &ByteTokenizer)
            .unwrap();
        let names: Vec<&str> = labs.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lab-lo-ministry",
                "lab-lo-university",
                "lab-lo-hospital",
                "lab-vi-ministry",
                "lab-vi-university",
                "lab-vi-hospital"
            ]
        );
        let whole = Layout::OnePerLanguage
            .labs(&langs, 0.1, &ByteTokenizer)
            .unwrap();
        assert_eq!(whole[0].name, "lab-lo");
        for (k, lang) in whole.iter().enumerate() {
            let shards = &labs[3 * k..3 * k + 3];
            let joined: Vec<u32> = shards.iter().flat_map(|s| s.corpus.train.clone()).collect();
            assert_eq!(joined, lang.corpus.train, "{}", lang.language);
            assert!(
                shards
                    .iter()
                    .all(|s| s.corpus.heldout == lang.corpus.heldout)
            );
            // 3 : 2 : 1, within a line.
            let (a, c) = (shards[0].corpus.train.len(), shards[2].corpus.train.len());
            assert!((2.5..3.5).contains(&(a as f64 / c as f64)), "{a} vs {c}");
        }
        assert!(matches!(
            Layout::PerCountry.labs(&["xx".into()], 0.1, &ByteTokenizer),
            Err(LayoutError::UnknownLanguage(_))
        ));
    }
}
