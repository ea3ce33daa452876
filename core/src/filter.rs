//! Event-type filtering (`allowed_events`): only payloads whose top-level `type` String starts
//! with one of the prefixes reach the handler. A payload without a String `type` (no `type`,
//! a `type` of another kind, a payload that is not an object) always does.
//!
//! The prefixes are kept sorted with every prefix that another one covers removed, so no prefix
//! of the set starts with another. Then the only prefix that can match a type is the greatest
//! one not above it (every string between a prefix and a type it starts would start with that
//! prefix too), found by binary search: O(log n) for n prefixes.

use crate::payload::Payload;

/// The allowed event-type prefixes.
#[derive(Debug, Clone)]
pub struct EventFilter {
    /// Sorted; none starts with another.
    prefixes: Vec<String>,
}

impl EventFilter {
    /// A filter allowing types that start with any of `prefixes`; `None` when there are none
    /// (every event is allowed).
    pub fn new(prefixes: &[String]) -> Option<Self> {
        let mut sorted: Vec<String> = prefixes.to_vec();
        sorted.sort();
        sorted.dedup();
        let mut kept: Vec<String> = Vec::with_capacity(sorted.len());
        for prefix in sorted {
            // Sorted order puts a covering prefix right before what it covers.
            if kept
                .last()
                .is_some_and(|last| prefix.starts_with(last.as_str()))
            {
                continue;
            }
            kept.push(prefix);
        }
        (!kept.is_empty()).then_some(Self { prefixes: kept })
    }

    /// Whether an event of type `kind` may reach the handler.
    pub fn allows_type(&self, kind: &str) -> bool {
        let candidate = match self.prefixes.binary_search_by(|p| p.as_str().cmp(kind)) {
            Ok(_) => return true,
            Err(0) => return false,
            Err(at) => &self.prefixes[at - 1],
        };
        kind.starts_with(candidate.as_str())
    }

    /// The event type of a payload: its top-level `type`, when it is a String.
    pub fn event_type(payload: &Payload) -> Option<&str> {
        payload.kind()?.as_str()
    }

    /// Whether a payload may reach the handler.
    pub fn allows(&self, payload: &Payload) -> bool {
        Self::event_type(payload).is_none_or(|kind| self.allows_type(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn payload(value: Value) -> Payload {
        Payload::parse(value.to_string().as_bytes()).unwrap()
    }

    fn filter(prefixes: &[&str]) -> EventFilter {
        EventFilter::new(&prefixes.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn the_readmes_examples() {
        let f = filter(&["user.", "account."]);
        assert!(f.allows(&payload(json!({"type": "user.created"}))));
        assert!(f.allows(&payload(json!({"type": "account.deleted"}))));
        assert!(!f.allows(&payload(json!({"type": "admin.user.created"}))));
        assert!(!f.allows(&payload(json!({"type": "my.account.deleted"}))));
        assert!(!f.allows(&payload(json!({"type": "notification"}))));
        assert!(f.allows(&payload(json!({"id": 1}))));
        assert!(f.allows(&payload(json!({"type": 7}))));
        assert!(f.allows(&payload(json!("user."))));
        assert!(f.allows(&Payload::null()));
        assert!(EventFilter::new(&[]).is_none());
    }

    #[test]
    fn covered_prefixes_are_dropped() {
        let f = filter(&["user.", "user.created", "a", "ab", "b"]);
        assert_eq!(f.prefixes, vec!["a", "b", "user."]);
        assert!(f.allows_type("user.created.v2"));
        assert!(f.allows_type("abc"));
        assert!(!f.allows_type("user"));
    }

    proptest! {
        #[test]
        fn matches_a_linear_scan(
            prefixes in proptest::collection::vec("[ab.]{0,4}", 1..8),
            kind in "[ab.]{0,6}",
        ) {
            let f = EventFilter::new(&prefixes).unwrap();
            let expected = prefixes.iter().any(|p| kind.starts_with(p.as_str()));
            prop_assert_eq!(f.allows_type(&kind), expected);
        }
    }
}
