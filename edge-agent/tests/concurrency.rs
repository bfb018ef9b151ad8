//! Many threads calling `check` on one key never admit past the grant.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    thread,
};

use edge_agent::{Agent, AgentConfig, Request};
use shared::{
    ManualClock, Nanos,
    wire::{AcquireReply, CheckOutcome},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_racing_on_one_key_admit_exactly_the_grant() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: c, path: /c, limit: 100000, window: 1m, key: global, strictness: hard, on_failure: closed }\n",
    );
    // The regional admits the first request exactly and grants a ceiling of 1,000; after
    // that it is gone, so everything past the grant is denied (closed).
    let grant = AcquireReply {
        request_id: 0,
        allowed: true,
        checks: vec![CheckOutcome {
            allowed: true,
            remaining: 99_000,
            reset_at: T0 + Nanos::from_secs(60),
            granted: 1000,
        }],
        reset_at: T0 + Nanos::from_secs(60),
        retry_after: Nanos::ZERO,
    };
    let upstream = Arc::new(Scripted {
        replies: Mutex::new(VecDeque::from([grant])),
    });
    let clock = ManualClock::new(T0);
    let agent: Agent = agent_with(AgentConfig::default(), &rules, upstream, &clock);
    let request = Request::new("GET", "/c");
    assert!(agent.check_async(&request, NonZeroU32::MIN).await.allowed);

    let threads: Vec<_> = (0..8)
        .map(|_| {
            let agent = agent.clone();
            thread::spawn(move || {
                let request = Request::new("GET", "/c");
                (0..500).filter(|_| agent.check(&request).allowed).count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        admitted, 1000,
        "exactly the grant, across 8 threads and 4,000 requests"
    );
}
