//! The places a file can be had besides Cistern, for Metalink (RFC 6249
//! `Link: rel=duplicate`, RFC 5854 `<url>`): the set's choice order with
//! nothing claimed, for describing rather than fetching.

use std::sync::atomic::Ordering;

use super::{MirrorSet, hash, lock, score};

impl MirrorSet {
    /// Upstreams that should have `rest` (the path below the prefix, with
    /// its query), best first: the enabled ones by the same weighted
    /// rendezvous score [`MirrorSet::order`] uses, then, when `with_down`,
    /// the disabled ones by their configured weight. An upstream that
    /// answered 404 for this file recently is left out: it does not have
    /// it. Unlike `order`, this claims no retry of a disabled upstream.
    pub fn alternatives(&self, rest: &str, with_down: bool) -> Vec<usize> {
        let now = self.now_ms();
        let file = hash(rest.as_bytes());
        let weights = self.effective_weights();
        let mut ranked: Vec<(usize, bool, f64)> = {
            let missing = lock(&self.missing);
            self.upstreams
                .iter()
                .enumerate()
                .filter(|(i, _)| missing.get(&(file, *i)).is_none_or(|&t| t <= now))
                .filter_map(|(i, u)| {
                    let enabled = weights[i] > 0.0;
                    let w = if enabled {
                        weights[i]
                    } else if with_down {
                        f64::from(u.weight)
                    } else {
                        return None;
                    };
                    Some((i, enabled, score(u.seed, file, w)))
                })
                .collect()
        };
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
        ranked.into_iter().map(|(i, _, _)| i).collect()
    }

    /// A number that changes whenever one of the set's upstreams is
    /// disabled or re-enabled.
    pub fn health_generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Bumps the generation when an upstream went from `was_down` to `down`.
    pub(super) fn note_change(&self, was_down: bool, down: bool) {
        if was_down != down {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::super::Outcome;
    use crate::clock::Clock;
    use crate::config::{ForwardedFor, HealthConfig, MirrorConfig, QueryMode, StaleRules};

    use super::*;

    fn set(clock: &Clock) -> MirrorSet {
        MirrorSet::new(
            &MirrorConfig {
                name: "debian".into(),
                prefix: "/debian/".into(),
                upstreams: vec![
                    "http://a.example/debian/".parse().unwrap(),
                    "http://b.example/d/".parse().unwrap(),
                    "http://c.example/".parse().unwrap(),
                ],
                policies: vec![],
                stale: StaleRules::default(),
                forwarded_for: ForwardedFor::Replace,
                weights: vec![1, 1, 1],
                health: HealthConfig::default(),
                query: QueryMode::Ignore,
                redirect: None,
            },
            clock,
        )
    }

    #[test]
    fn alternatives_follow_the_choice_order_and_health_without_claiming_retries() {
        let clock = Clock::manual(SystemTime::now());
        let s = set(&clock);
        let f = "pool/x.deb";
        let all = s.alternatives(f, false);
        assert_eq!(all.len(), 3);
        let order: Vec<usize> = s.order(f).iter().map(|c| c.index).collect();
        assert_eq!(all, order, "the same order as the choice");
        let g0 = s.health_generation();
        let first = all[0];
        for _ in 0..3 {
            s.report(first, Outcome::Failed("connection refused"));
        }
        assert_ne!(s.health_generation(), g0, "a disabled upstream bumps it");
        assert!(!s.alternatives(f, false).contains(&first));
        assert_eq!(s.alternatives(f, true).last(), Some(&first));
        // Past its retry time describing it claims nothing: the next
        // client request is still the one that retries it.
        clock.advance(std::time::Duration::from_secs(31));
        assert!(!s.alternatives(f, false).contains(&first));
        assert_eq!(s.order(f)[0].index, first);
        s.remember_missing(all[1], f);
        assert!(
            !s.alternatives(f, true).contains(&all[1]),
            "a 404 is left out"
        );
        let g1 = s.health_generation();
        s.report(
            first,
            Outcome::Answered(std::time::Duration::from_millis(1)),
        );
        assert_ne!(s.health_generation(), g1, "re-enabled bumps it");
    }
}
