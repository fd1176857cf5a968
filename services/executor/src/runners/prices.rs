//! What tokens cost, for agents that report tokens but no money: a price
//! table per model (`prices.json`, built in), which `OMOI_PRICE_TABLE_FILE`
//! adds to or overrides.

use std::collections::BTreeMap;
use std::path::Path;

use omoi_proto::common::Usage;
use serde::Deserialize;

const BUILT_IN: &str = include_str!("../../prices.json");

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cache_read: f64,
    #[serde(default)]
    pub cache_write: f64,
}

#[derive(Debug, Deserialize)]
struct File {
    models: BTreeMap<String, Price>,
}

#[derive(Debug, Clone)]
pub struct PriceTable {
    models: BTreeMap<String, Price>,
}

impl PriceTable {
    /// The built-in table, with `file`'s entries added over it.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut models = parse(BUILT_IN)?.models;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("OMOI_PRICE_TABLE_FILE {}: {e}", path.display()))?;
            let extra = parse(&text).map_err(|e| anyhow::anyhow!("OMOI_PRICE_TABLE_FILE {}: {e}", path.display()))?;
            models.extend(extra.models);
        }
        Ok(Self { models })
    }

    /// The price of `model`: its own, else that of the longest name it
    /// starts with (`gpt-5-codex-2025` prices as `gpt-5-codex`).
    pub fn price(&self, model: &str) -> Option<Price> {
        self.models.get(model).copied().or_else(|| {
            self.models
                .iter()
                .filter(|(name, _)| model.starts_with(name.as_str()))
                .max_by_key(|(name, _)| name.len())
                .map(|(_, p)| *p)
        })
    }

    /// Sets `usage`'s cost from its tokens, marked estimated; false when the
    /// model has no price (the cost stays unknown, at zero).
    pub fn estimate(&self, usage: &mut Usage) -> bool {
        let Some(p) = self.price(&usage.model) else {
            return false;
        };
        usage.cost_usd = (usage.input_tokens as f64 * p.input
            + usage.output_tokens as f64 * p.output
            + usage.cache_read_tokens as f64 * p.cache_read
            + usage.cache_write_tokens as f64 * p.cache_write)
            / 1e6;
        usage.cost_estimated = true;
        true
    }
}

fn parse(text: &str) -> anyhow::Result<File> {
    let file: File = serde_json::from_str(text)?;
    for (name, p) in &file.models {
        let all = [p.input, p.output, p.cache_read, p.cache_write];
        anyhow::ensure!(
            all.iter().all(|x| x.is_finite() && *x >= 0.0),
            "the prices of {name} must be non-negative numbers"
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_match_exactly_or_by_their_longest_prefix() {
        let t = PriceTable::load(None).unwrap();
        assert_eq!(t.price("gpt-5-codex").unwrap().input, 1.25);
        assert_eq!(t.price("gpt-5-mini-2025-08-07").unwrap().input, 0.25);
        assert_eq!(t.price("gemini-2.5-flash-lite").unwrap().output, 0.4);
        assert_eq!(t.price("claude-sonnet-4-5").unwrap().cache_write, 3.75);
        assert!(t.price("llama-3").is_none());
        let mut u = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            cache_read_tokens: 2_000_000,
            model: "gpt-5-codex".into(),
            ..Default::default()
        };
        assert!(t.estimate(&mut u));
        assert!((u.cost_usd - (1.25 + 1.0 + 0.25)).abs() < 1e-9);
        assert!(u.cost_estimated);
        let mut unknown = Usage {
            model: "llama-3".into(),
            input_tokens: 5,
            ..Default::default()
        };
        assert!(!t.estimate(&mut unknown));
        assert_eq!((unknown.cost_usd, unknown.cost_estimated), (0.0, false));
    }

    #[test]
    fn a_file_adds_and_overrides_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("omoi-prices-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"models": {"gpt-5-codex": {"input": 2, "output": 20}, "local-model": {"input": 0, "output": 0}}}"#,
        )
        .unwrap();
        let t = PriceTable::load(Some(&good)).unwrap();
        assert_eq!(t.price("gpt-5-codex").unwrap().input, 2.0);
        assert_eq!(t.price("local-model").unwrap().output, 0.0);
        assert_eq!(t.price("gpt-5").unwrap().input, 1.25);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"models": {"x": {"input": -1, "output": 1}}}"#).unwrap();
        assert!(PriceTable::load(Some(&bad)).unwrap_err().to_string().contains("x"));
        std::fs::write(&bad, r#"{"models": {"x": {"inptu": 1, "output": 1}}}"#).unwrap();
        assert!(PriceTable::load(Some(&bad)).is_err());
        assert!(PriceTable::load(Some(&dir.join("missing.json"))).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
