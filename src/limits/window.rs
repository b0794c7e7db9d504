//! The sliding window every limit is counted in, kept in process. Redis keeps the same window
//! with the same arithmetic in `redis_store.rs`; a replica without Redis, or with Redis away,
//! counts here.
//!
//! The window is 31 buckets of 2 s: a minute and the bucket a call falls in. A call is counted in
//! the bucket of its admission and stays counted until that bucket has left the window, 60 to
//! 62 s later, so at most `limit` calls are admitted in any 60 s, and a steady caller gets at
//! least 60/62 of its limit. (With 30 buckets a call left after 58 to 60 s, and calls at the end
//! of one bucket and just past the window could reach twice the limit within 60 s.)

use std::hash::BuildHasher;

use foldhash::HashMap;
use parking_lot::Mutex;

use super::{Counter, Outcome, Used};

/// Width of one bucket.
pub const BUCKET_MS: i64 = 2_000;
/// Buckets in the window.
pub const BUCKETS: i64 = 31;

/// One bucket's counts.
#[derive(Clone, Copy, Default)]
struct Slot {
    bucket: i64,
    requests: i64,
    tokens: i64,
}

/// One counter's window: a ring of buckets, indexed by bucket number.
struct Window {
    slots: [Slot; BUCKETS as usize],
}

impl Window {
    fn new() -> Self {
        Window {
            slots: [Slot::default(); BUCKETS as usize],
        }
    }

    fn live(&self, now_bucket: i64) -> impl Iterator<Item = &Slot> {
        let oldest = now_bucket - BUCKETS + 1;
        self.slots
            .iter()
            .filter(move |s| s.bucket >= oldest && s.bucket <= now_bucket)
    }

    fn used(&self, now_bucket: i64) -> Used {
        let (requests, tokens) = self
            .live(now_bucket)
            .fold((0, 0), |(r, t), s| (r + s.requests, t + s.tokens));
        Used {
            requests,
            tokens: tokens.max(0),
        }
    }

    /// Milliseconds until enough of `excess` has left the window.
    fn wait_ms(&self, now_ms: i64, excess: i64, of: impl Fn(&Slot) -> i64) -> i64 {
        let now_bucket = now_ms / BUCKET_MS;
        let mut live: Vec<&Slot> = self.live(now_bucket).collect();
        live.sort_by_key(|s| s.bucket);
        let mut freed = 0;
        for slot in live {
            freed += of(slot);
            if freed >= excess {
                return (slot.bucket + BUCKETS) * BUCKET_MS - now_ms;
            }
        }
        BUCKETS * BUCKET_MS
    }

    fn slot_mut(&mut self, bucket: i64) -> &mut Slot {
        let slot = &mut self.slots[bucket.rem_euclid(BUCKETS) as usize];
        if slot.bucket != bucket {
            *slot = Slot {
                bucket,
                ..Slot::default()
            };
        }
        slot
    }
}

/// Every counter of this process, sharded by user so a user's counters share one lock and are
/// checked and charged together.
pub struct LocalWindows {
    shards: Vec<Mutex<HashMap<String, Window>>>,
    hasher: foldhash::fast::RandomState,
}

const SHARDS: usize = 16;

impl Default for LocalWindows {
    fn default() -> Self {
        LocalWindows {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: Default::default(),
        }
    }
}

impl LocalWindows {
    fn shard(&self, user_id: &str) -> &Mutex<HashMap<String, Window>> {
        &self.shards[self.hasher.hash_one(user_id) as usize % SHARDS]
    }

    /// Checks every counter and, when all have room, charges the call to each.
    pub fn acquire(
        &self,
        user_id: &str,
        counters: &[Counter],
        tokens: i64,
        now_ms: i64,
    ) -> Outcome {
        let now_bucket = now_ms / BUCKET_MS;
        let mut shard = self.shard(user_id).lock();
        let mut used = Vec::with_capacity(counters.len());
        let mut retry_ms = 0;
        for counter in counters {
            // Look up before inserting: the key is cloned only for a counter's first call.
            if !shard.contains_key(&counter.key) {
                shard.insert(counter.key.clone(), Window::new());
            }
            let window = shard.get(&counter.key).expect("inserted above");
            let now = window.used(now_bucket);
            if let Some(rpm) = counter.quota.rpm {
                if now.requests + 1 > rpm {
                    let wait = window.wait_ms(now_ms, now.requests + 1 - rpm, |s| s.requests);
                    retry_ms = retry_ms.max(wait);
                }
            }
            if let Some(tpm) = counter.quota.tpm {
                let need = now.tokens + tokens.max(1);
                if need > tpm {
                    let wait = window.wait_ms(now_ms, need - tpm, |s| s.tokens);
                    retry_ms = retry_ms.max(wait);
                }
            }
            used.push(now);
        }
        let admitted = retry_ms == 0;
        if admitted {
            for (counter, used) in counters.iter().zip(used.iter_mut()) {
                let window = shard.get_mut(&counter.key).expect("inserted above");
                let slot = window.slot_mut(now_bucket);
                slot.requests += 1;
                slot.tokens += tokens;
                used.requests += 1;
                used.tokens += tokens;
            }
        }
        Outcome {
            admitted,
            retry_ms,
            bucket: now_bucket,
            used,
        }
    }

    /// Corrects the tokens charged in `bucket` by `delta` once the real usage is known.
    pub fn settle(&self, user_id: &str, keys: &[String], bucket: i64, delta: i64, now_ms: i64) {
        if bucket <= now_ms / BUCKET_MS - BUCKETS {
            return; // already out of the window
        }
        let mut shard = self.shard(user_id).lock();
        for key in keys {
            if let Some(window) = shard.get_mut(key) {
                let slot = &mut window.slots[bucket.rem_euclid(BUCKETS) as usize];
                if slot.bucket == bucket {
                    slot.tokens += delta;
                }
            }
        }
    }

    /// Drops windows with nothing left in them, so idle users cost no memory.
    pub fn prune(&self, now_ms: i64) {
        let oldest = now_ms / BUCKET_MS - BUCKETS + 1;
        for shard in &self.shards {
            shard
                .lock()
                .retain(|_, w| w.slots.iter().any(|s| s.bucket >= oldest));
        }
    }

    /// Forgets every count (used when Redis takes over again).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::rules::Quota;

    fn counter(rpm: Option<i64>, tpm: Option<i64>) -> Vec<Counter> {
        vec![Counter {
            key: "u".into(),
            quota: Quota { rpm, tpm },
        }]
    }

    #[test]
    fn requests_are_refused_past_the_limit_until_their_bucket_leaves() {
        let w = LocalWindows::default();
        let c = counter(Some(2), None);
        let t0 = 1_000_000;
        assert!(w.acquire("u", &c, 0, t0).admitted);
        assert!(w.acquire("u", &c, 0, t0 + 500).admitted);
        let refused = w.acquire("u", &c, 0, t0 + 1_000);
        assert!(!refused.admitted);
        assert_eq!(refused.used[0].requests, 2);
        // Counted in bucket 500 (1_000_000 / 2_000): free once bucket 531 starts, 62 s after
        // the first call and 61.5 s after the second, never sooner than 60 s after either.
        assert_eq!(refused.retry_ms, 531 * BUCKET_MS - (t0 + 1_000));
        assert!(!w.acquire("u", &c, 0, t0 + 60_499).admitted);
        assert!(w.acquire("u", &c, 0, 531 * BUCKET_MS).admitted);
    }

    #[test]
    fn tokens_are_charged_then_settled() {
        let w = LocalWindows::default();
        let c = counter(None, Some(100));
        let t0 = 2_000_000;
        let first = w.acquire("u", &c, 10, t0);
        assert!(first.admitted);
        assert_eq!(first.used[0].tokens, 10);
        // The answer used 95 tokens, not 10.
        w.settle("u", &["u".into()], first.bucket, 85, t0 + 10);
        let second = w.acquire("u", &c, 10, t0 + 20);
        assert!(!second.admitted, "95 + 10 > 100");
        assert_eq!(second.used[0].tokens, 95);
    }

    #[test]
    fn a_refusal_charges_nothing_and_pruning_forgets_idle_users() {
        let w = LocalWindows::default();
        let both = vec![
            Counter {
                key: "u".into(),
                quota: Quota {
                    rpm: Some(10),
                    tpm: None,
                },
            },
            Counter {
                key: "u:m:gpt".into(),
                quota: Quota {
                    rpm: Some(1),
                    tpm: None,
                },
            },
        ];
        assert!(w.acquire("u", &both, 0, 0).admitted);
        let refused = w.acquire("u", &both, 0, 1);
        assert!(!refused.admitted);
        assert_eq!(
            refused.used[0].requests, 1,
            "the user counter was not charged"
        );
        w.prune(BUCKETS * BUCKET_MS * 2);
        assert!(w.shards.iter().all(|s| s.lock().is_empty()));
    }
}
