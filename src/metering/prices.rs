//! What a call costs: the price table (seeded from `config/prices.toml`, overridden through
//! `/admin/prices`), how a model finds its price, and the arithmetic, in whole nano-USD.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use serde::Deserialize;

use super::usage::{ImageSpec, Usage};
use crate::domain::money::usd_to_nanos;
use crate::domain::{now, Price};

/// The price table shipped with the binary.
const DEFAULT_PRICES: &str = include_str!("../../config/prices.toml");

/// The prices in force, swapped whole when an admin changes one.
#[derive(Default)]
pub struct PriceBook {
    prices: ArcSwap<HashMap<String, Price>>,
}

impl PriceBook {
    /// Replaces the table.
    pub fn replace(&self, prices: Vec<Price>) {
        let table = prices.into_iter().map(|p| (p.model.clone(), p)).collect();
        self.prices.store(Arc::new(table));
    }

    /// The price of `model`: its own entry, else that of the longest priced name it extends
    /// with a `-` (`gpt-4o-2024-08-06` is priced as `gpt-4o`), after dropping any provider prefix
    /// (`openai/gpt-4o`). Image calls first look for `model:quality:size`, then `model:size`,
    /// with OpenAI's defaults for what the call left out (`standard`, `1024x1024`).
    pub fn price_of(&self, model: &str, image: Option<&ImageSpec>) -> Option<Price> {
        let table = self.prices.load();
        let name = model.rsplit('/').next().unwrap_or(model);
        let base = [model, name]
            .into_iter()
            .find_map(|m| table.get(m))
            .or_else(|| {
                table
                    .iter()
                    .filter(|(k, _)| {
                        name.strip_prefix(k.as_str())
                            .is_some_and(|rest| rest.starts_with('-'))
                    })
                    .max_by_key(|(k, _)| k.len())
                    .map(|(_, p)| p)
            })?;
        if let Some(ImageSpec { size, quality }) = image {
            let size = size.as_deref().unwrap_or("1024x1024");
            let quality = quality.as_deref().unwrap_or("standard");
            let variants = [
                format!("{}:{quality}:{size}", base.model),
                format!("{}:{size}", base.model),
            ];
            if let Some(price) = variants.iter().find_map(|k| table.get(k)) {
                return Some(price.clone());
            }
        }
        Some(base.clone())
    }
}

/// The cost of `usage` at `price`, in nano-USD:
/// `(prompt - cached) × input + cached × cached_input + (completion - reasoning) × output +
/// reasoning × reasoning`, per million tokens, plus characters at the input price per million,
/// images at the per-image price and audio seconds at the per-second price. Computed in 128-bit
/// integers and rounded once, at the end, to the nearest nano-USD.
pub fn cost_nanos(usage: &Usage, price: &Price) -> i64 {
    let cached = usage.cached_tokens.clamp(0, usage.prompt_tokens.max(0)) as i128;
    let reasoning = usage
        .reasoning_tokens
        .clamp(0, usage.completion_tokens.max(0)) as i128;
    let prompt = usage.prompt_tokens.max(0) as i128;
    let completion = usage.completion_tokens.max(0) as i128;
    let input = price.input_per_mtok_nanos as i128;
    let output = price.output_per_mtok_nanos as i128;
    let cached_input = price
        .cached_input_per_mtok_nanos
        .unwrap_or(price.input_per_mtok_nanos) as i128;
    let reasoning_price = price
        .reasoning_per_mtok_nanos
        .unwrap_or(price.output_per_mtok_nanos) as i128;
    let per_million = (prompt - cached) * input
        + cached * cached_input
        + (completion - reasoning) * output
        + reasoning * reasoning_price
        + usage.characters.max(0) as i128 * input;
    let tokens = (per_million + 500_000) / 1_000_000;
    let images = usage.images.max(0) as i128 * price.per_image_nanos.unwrap_or(0) as i128;
    let audio = (usage.audio_seconds.max(0.0) * price.per_audio_second_nanos.unwrap_or(0) as f64)
        .round() as i128;
    (tokens + images + audio).clamp(0, i64::MAX as i128) as i64
}

/// A model's prices in USD, as `PUT /admin/prices/{model}` and the shipped table give them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceInUsd {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    pub reasoning_per_mtok: Option<f64>,
    pub per_image: Option<f64>,
    pub per_audio_second: Option<f64>,
}

impl PriceInUsd {
    /// The price of `model` in nano-USD, or which field is not a non-negative amount.
    pub fn into_price(self, model: String) -> Result<Price, String> {
        let nanos = |field: &str, usd: f64| {
            usd_to_nanos(usd).ok_or_else(|| format!("{field} must be a non-negative number"))
        };
        let optional = |field: &str, usd: Option<f64>| usd.map(|v| nanos(field, v)).transpose();
        Ok(Price {
            input_per_mtok_nanos: nanos("input_per_mtok", self.input_per_mtok)?,
            output_per_mtok_nanos: nanos("output_per_mtok", self.output_per_mtok)?,
            cached_input_per_mtok_nanos: optional(
                "cached_input_per_mtok",
                self.cached_input_per_mtok,
            )?,
            reasoning_per_mtok_nanos: optional("reasoning_per_mtok", self.reasoning_per_mtok)?,
            per_image_nanos: optional("per_image", self.per_image)?,
            per_audio_second_nanos: optional("per_audio_second", self.per_audio_second)?,
            model,
            updated_at: now(),
        })
    }
}

/// The shipped table: `[prices."<model>"]` entries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    prices: BTreeMap<String, PriceInUsd>,
}

/// The shipped price table.
pub fn default_prices() -> anyhow::Result<Vec<Price>> {
    let table: Table = toml::from_str(DEFAULT_PRICES)?;
    table
        .prices
        .into_iter()
        .map(|(model, usd)| {
            usd.into_price(model.clone())
                .map_err(|e| anyhow::anyhow!("shipped price of {model}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> PriceBook {
        let book = PriceBook::default();
        book.replace(default_prices().unwrap());
        book
    }

    #[test]
    fn the_shipped_table_parses() {
        assert!(default_prices().unwrap().len() > 40);
    }

    #[test]
    fn dated_and_prefixed_models_find_their_family() {
        let book = book();
        assert_eq!(
            book.price_of("gpt-4o-2024-08-06", None).unwrap().model,
            "gpt-4o"
        );
        assert_eq!(
            book.price_of("gpt-4o-mini-2024-07-18", None).unwrap().model,
            "gpt-4o-mini"
        );
        assert_eq!(
            book.price_of("openai/gpt-4o", None).unwrap().model,
            "gpt-4o"
        );
        assert!(book.price_of("llama-3", None).is_none());
    }

    /// Variants that cost several times their base have entries of their own.
    #[test]
    fn pricier_variants_are_not_priced_as_their_base() {
        let book = book();
        for (model, priced_as) in [
            ("o3-pro-2025-06-10", "o3-pro"),
            ("o1-pro", "o1-pro"),
            ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
            ("claude-opus-4-5-20251101", "claude-opus-4-5"),
            ("claude-opus-4-20250514", "claude-opus-4"),
            ("gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct"),
            ("gpt-4-0613", "gpt-4"),
        ] {
            assert_eq!(
                book.price_of(model, None).unwrap().model,
                priced_as,
                "{model}"
            );
        }
    }

    #[test]
    fn image_prices_follow_quality_and_size() {
        let book = book();
        let hd = ImageSpec {
            size: Some("1024x1792".into()),
            quality: Some("hd".into()),
        };
        assert_eq!(
            book.price_of("dall-e-3", Some(&hd))
                .unwrap()
                .per_image_nanos,
            Some(120_000_000)
        );
        let small = ImageSpec {
            size: Some("256x256".into()),
            quality: None,
        };
        assert_eq!(
            book.price_of("dall-e-2", Some(&small))
                .unwrap()
                .per_image_nanos,
            Some(16_000_000)
        );
        assert_eq!(
            book.price_of("dall-e-3", Some(&ImageSpec::default()))
                .unwrap()
                .per_image_nanos,
            Some(40_000_000)
        );
        // What a call leaves out is OpenAI's default: standard quality, 1024x1024.
        let wide = ImageSpec {
            size: Some("1792x1024".into()),
            quality: None,
        };
        let hd_square = ImageSpec {
            size: None,
            quality: Some("hd".into()),
        };
        for spec in [wide, hd_square] {
            assert_eq!(
                book.price_of("dall-e-3", Some(&spec))
                    .unwrap()
                    .per_image_nanos,
                Some(80_000_000)
            );
        }
        assert_eq!(
            book.price_of("dall-e-2", Some(&ImageSpec::default()))
                .unwrap()
                .per_image_nanos,
            Some(20_000_000)
        );
    }

    #[test]
    fn each_part_is_billed_at_its_own_price() {
        let price = book().price_of("gpt-4o", None).unwrap();
        let usage = Usage {
            prompt_tokens: 1000,
            cached_tokens: 400,
            completion_tokens: 200,
            reasoning_tokens: 50,
            ..Usage::default()
        };
        // 600 × 2.5 + 400 × 1.25 + 150 × 10 + 50 × 10 (reasoning falls back to output), per M.
        let expected = (600.0 * 2.5 + 400.0 * 1.25 + 150.0 * 10.0 + 50.0 * 10.0) * 1000.0;
        assert_eq!(cost_nanos(&usage, &price), expected as i64);
    }

    #[test]
    fn audio_and_speech_are_billed_by_second_and_character() {
        let book = book();
        let whisper = book.price_of("whisper-1", None).unwrap();
        let usage = Usage {
            audio_seconds: 90.0,
            ..Usage::default()
        };
        assert_eq!(cost_nanos(&usage, &whisper), 9_000_000);
        let tts = book.price_of("tts-1", None).unwrap();
        let usage = Usage {
            characters: 1000,
            ..Usage::default()
        };
        assert_eq!(cost_nanos(&usage, &tts), 15_000_000);
    }
}
