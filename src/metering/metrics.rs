//! `/metrics`: Prometheus counters and histograms. Call metrics are updated by the accountant
//! from each call's record, off the request path; the request path itself only bumps cache
//! counters (one relaxed atomic add each).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    models: parking_lot::Mutex<foldhash::HashSet<String>>,
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
            models: Default::default(),
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

    /// A model name as a label value: itself while the set of names is small, else `other`.
    fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let mut models = self.models.lock();
        if models.contains(model) {
            return model;
        }
        if models.len() < MAX_MODEL_LABELS {
            models.insert(model.to_owned());
            return model;
        }
        "other"
    }

    /// One finished call.
    pub fn call(
        &self,
        route: &str,
        model: Option<&str>,
        status: u16,
        latency_secs: f64,
        ttfb_secs: Option<f64>,
    ) {
        let model = model.map_or("", |m| self.model_label(m));
        self.calls
            .with_label_values(&[route, model, itoa::Buffer::new().format(status)])
            .inc();
        self.latency
            .with_label_values(&[route])
            .observe(latency_secs);
        if let Some(ttfb) = ttfb_secs {
            self.ttfb.with_label_values(&[route]).observe(ttfb);
        }
    }

    /// One attempt on an upstream key.
    pub fn attempt(&self, key_id: &str, outcome: &str) {
        self.attempts.with_label_values(&[key_id, outcome]).inc();
    }

    /// What a call used and cost, by the model that served it.
    pub fn usage(&self, model: &str, usage: &Usage, cost_usd: f64) {
        let model = self.model_label(model);
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cached", usage.cached_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .with_label_values(&[model, kind])
                    .inc_by(n as u64);
            }
        }
        if cost_usd > 0.0 {
            self.cost.with_label_values(&[model]).inc_by(cost_usd);
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
