//! `/metrics`: Prometheus counters and histograms. Call metrics are updated by the accountant
//! from each call's record, off the request path; the request path itself only bumps cache
//! counters (one relaxed atomic add each).

use foldhash::HashMap;
use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::usage::Usage;

/// Most distinct model names used as label values; further names are counted as `other`, so a
/// client inventing model names cannot grow the metrics without bound.
const MAX_MODEL_LABELS: usize = 500;

/// Latency buckets, in seconds: from a cached refusal to a long generation.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Every metric Switchyard exports.
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    latency: HistogramVec,
    ttfb: HistogramVec,
    attempts: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    queue_depth: IntGaugeVec,
    dropped: IntCounterVec,
    cache: IntCounterVec,
    cache_hit_ratio: GaugeVec,
    /// The (cache, layer) pairs whose hit ratio is exported.
    cache_layers: parking_lot::Mutex<Vec<(String, String)>>,
    /// The per-call series, looked up once each. `with_label_values` hashes every label value
    /// with SipHash and takes the vector's lock on each use, about nine times a call; a handle
    /// is an atomic add.
    series: parking_lot::Mutex<Series>,
}

/// Handles of the series every call touches, by their labels.
#[derive(Default)]
struct Series {
    /// By model label: at most [`MAX_MODEL_LABELS`] names, then `other`.
    models: HashMap<String, ModelSeries>,
    /// Latency and time to first byte, by route.
    routes: HashMap<&'static str, (Histogram, Histogram)>,
    /// By upstream key id, then outcome.
    attempts: HashMap<String, HashMap<&'static str, IntCounter>>,
}

struct ModelSeries {
    /// The model label: the name, or `other`.
    label: String,
    /// By route and status.
    calls: HashMap<(&'static str, u16), IntCounter>,
    /// Prompt, completion, reasoning and cached tokens, in [`TOKEN_KINDS`]' order.
    tokens: [Option<IntCounter>; 4],
    cost: Option<Counter>,
}

const TOKEN_KINDS: [&str; 4] = ["prompt", "completion", "reasoning", "cached"];

impl Series {
    /// The series of `model`: labelled with its name while the set of names is small, else
    /// `other`, so a client inventing model names cannot grow the metrics without bound.
    fn model(&mut self, model: &str) -> &mut ModelSeries {
        let known = self.models.contains_key(model);
        let name = if known || self.models.len() < MAX_MODEL_LABELS {
            model
        } else {
            "other"
        };
        if !known && !self.models.contains_key(name) {
            let series = ModelSeries {
                label: name.to_owned(),
                calls: HashMap::default(),
                tokens: Default::default(),
                cost: None,
            };
            self.models.insert(name.to_owned(), series);
        }
        self.models.get_mut(name).expect("inserted above")
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("switchyard".into()), None)?;
        let calls = IntCounterVec::new(
            Opts::new(
                "calls_total",
                "Data-plane calls by route, model asked for and status.",
            ),
            &["route", "model", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "call_duration_seconds",
                "Time from a call's start to its last byte.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_byte_seconds",
                "Time from a call's start to the first byte of its answer.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "upstream_attempts_total",
                "Attempts on upstream keys by key id and outcome.",
            ),
            &["upstream_key_id", "outcome"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("tokens_total", "Tokens metered by upstream model and kind."),
            &["model", "kind"],
        )?;
        let cost = CounterVec::new(
            Opts::new("cost_usd_total", "Cost metered, in USD, by upstream model."),
            &["model"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new("queue_depth", "Records waiting in each metering stage."),
            &["queue"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "dropped_records_total",
                "Metering records dropped because a bounded buffer was full.",
            ),
            &["queue"],
        )?;
        let cache = IntCounterVec::new(
            Opts::new(
                "cache_lookups_total",
                "Cache lookups by cache, layer (memory: the replica's LRU; redis: shared by \
                 replicas, asked on a memory miss) and result.",
            ),
            &["cache", "layer", "result"],
        )?;
        let cache_hit_ratio = GaugeVec::new(
            Opts::new(
                "cache_hit_ratio",
                "Share of lookups each cache layer answered since the start.",
            ),
            &["cache", "layer"],
        )?;
        for collector in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(ttfb.clone()),
            Box::new(attempts.clone()),
            Box::new(tokens.clone()),
            Box::new(cost.clone()),
            Box::new(queue_depth.clone()),
            Box::new(dropped.clone()),
            Box::new(cache.clone()),
            Box::new(cache_hit_ratio.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            registry,
            calls,
            latency,
            ttfb,
            attempts,
            tokens,
            cost,
            queue_depth,
            dropped,
            cache,
            cache_hit_ratio,
            cache_layers: Default::default(),
            series: Default::default(),
        })
    }

    /// The counter of one cache layer's hits or misses, for the cache to bump itself.
    pub fn cache_counter(&self, cache: &str, layer: &str, hit: bool) -> IntCounter {
        let mut layers = self.cache_layers.lock();
        let pair = (cache.to_owned(), layer.to_owned());
        if !layers.contains(&pair) {
            layers.push(pair);
        }
        self.cache
            .with_label_values(&[cache, layer, if hit { "hit" } else { "miss" }])
    }

    /// Sets each cache layer's hit ratio from its counters.
    fn update_hit_ratios(&self) {
        for (cache, layer) in self.cache_layers.lock().iter() {
            let count = |result: &str| {
                self.cache
                    .with_label_values(&[cache.as_str(), layer, result])
                    .get()
            };
            let (hits, misses) = (count("hit"), count("miss"));
            let ratio = if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            };
            self.cache_hit_ratio
                .with_label_values(&[cache.as_str(), layer])
                .set(ratio);
        }
    }

    /// One finished call.
    pub fn call(
        &self,
        route: &'static str,
        model: Option<&str>,
        status: u16,
        latency_secs: f64,
        ttfb_secs: Option<f64>,
    ) {
        let mut series = self.series.lock();
        let (latency, ttfb) = series.routes.entry(route).or_insert_with(|| {
            (
                self.latency.with_label_values(&[route]),
                self.ttfb.with_label_values(&[route]),
            )
        });
        latency.observe(latency_secs);
        if let Some(secs) = ttfb_secs {
            ttfb.observe(secs);
        }
        let model = series.model(model.unwrap_or(""));
        let label = &model.label;
        model
            .calls
            .entry((route, status))
            .or_insert_with(|| {
                let status = itoa::Buffer::new().format(status).to_owned();
                self.calls.with_label_values(&[route, label, &status])
            })
            .inc();
    }

    /// One attempt on an upstream key.
    pub fn attempt(&self, key_id: &str, outcome: &'static str) {
        let mut series = self.series.lock();
        let by_outcome = match series.attempts.get_mut(key_id) {
            Some(by_outcome) => by_outcome,
            None => series.attempts.entry(key_id.to_owned()).or_default(),
        };
        by_outcome
            .entry(outcome)
            .or_insert_with(|| self.attempts.with_label_values(&[key_id, outcome]))
            .inc();
    }

    /// What a call used and cost, by the model that served it.
    pub fn usage(&self, model: &str, usage: &Usage, cost_usd: f64) {
        let mut series = self.series.lock();
        let model = series.model(model);
        let label = &model.label;
        let counts = [
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
            usage.cached_tokens,
        ];
        for ((kind, n), handle) in TOKEN_KINDS.iter().zip(counts).zip(&mut model.tokens) {
            if n > 0 {
                handle
                    .get_or_insert_with(|| self.tokens.with_label_values(&[label.as_str(), kind]))
                    .inc_by(n as u64);
            }
        }
        if cost_usd > 0.0 {
            model
                .cost
                .get_or_insert_with(|| self.cost.with_label_values(&[label]))
                .inc_by(cost_usd);
        }
    }

    /// Records waiting in `queue`.
    pub fn queue_depth(&self, queue: &str, depth: usize) {
        self.queue_depth
            .with_label_values(&[queue])
            .set(depth as i64);
    }

    /// Records `queue` had to drop.
    pub fn dropped(&self, queue: &str, n: u64) {
        if n > 0 {
            self.dropped.with_label_values(&[queue]).inc_by(n);
        }
    }

    /// Everything, in Prometheus's text format.
    pub fn render(&self) -> String {
        self.update_hit_ratios();
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, starts: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(starts))
    }

    #[test]
    fn handles_found_once_keep_counting_under_their_labels() {
        let metrics = Metrics::new().unwrap();
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            ..Usage::default()
        };
        for _ in 0..3 {
            metrics.call("chat", Some("gpt-4o"), 200, 0.01, Some(0.005));
            metrics.attempt("upk_1", "answered");
            metrics.usage("gpt-4o", &usage, 0.25);
        }
        metrics.call("chat", Some("gpt-4o"), 429, 0.01, None);
        let text = metrics.render();
        let calls = r#"switchyard_calls_total{model="gpt-4o",route="chat",status="#;
        assert_eq!(
            line(&text, &format!("{calls}\"200\"}}")).unwrap(),
            format!("{calls}\"200\"}} 3")
        );
        assert_eq!(
            line(&text, &format!("{calls}\"429\"}}")).unwrap(),
            format!("{calls}\"429\"}} 1")
        );
        let attempts =
            r#"switchyard_upstream_attempts_total{outcome="answered",upstream_key_id="upk_1"}"#;
        assert_eq!(line(&text, attempts).unwrap(), format!("{attempts} 3"));
        let prompt = r#"switchyard_tokens_total{kind="prompt",model="gpt-4o"}"#;
        assert_eq!(line(&text, prompt).unwrap(), format!("{prompt} 30"));
        let completion = r#"switchyard_tokens_total{kind="completion",model="gpt-4o"}"#;
        assert_eq!(line(&text, completion).unwrap(), format!("{completion} 15"));
        assert!(line(&text, r#"switchyard_tokens_total{kind="reasoning""#).is_none());
        let cost = r#"switchyard_cost_usd_total{model="gpt-4o"}"#;
        assert_eq!(line(&text, cost).unwrap(), format!("{cost} 0.75"));
        let latency = r#"switchyard_call_duration_seconds_count{route="chat"}"#;
        assert_eq!(line(&text, latency).unwrap(), format!("{latency} 4"));
        let ttfb = r#"switchyard_time_to_first_byte_seconds_count{route="chat"}"#;
        assert_eq!(line(&text, ttfb).unwrap(), format!("{ttfb} 3"));
    }

    #[test]
    fn model_names_past_the_bound_are_counted_as_other() {
        let metrics = Metrics::new().unwrap();
        for i in 0..MAX_MODEL_LABELS + 10 {
            metrics.call("chat", Some(&format!("m{i}")), 200, 0.01, None);
        }
        // A name seen before the bound keeps its own label.
        metrics.call("chat", Some("m0"), 200, 0.01, None);
        let text = metrics.render();
        let other = r#"switchyard_calls_total{model="other",route="chat",status="200"}"#;
        assert_eq!(line(&text, other).unwrap(), format!("{other} 10"));
        let m0 = r#"switchyard_calls_total{model="m0",route="chat",status="200"}"#;
        assert_eq!(line(&text, m0).unwrap(), format!("{m0} 2"));
        let labelled = text
            .lines()
            .filter(|l| l.starts_with("switchyard_calls_total{"))
            .count();
        assert_eq!(labelled, MAX_MODEL_LABELS + 1);
    }
}
