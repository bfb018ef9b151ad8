//! Upstreams for the tests: the simulator's regional behind the `Upstream` trait, and fakes
//! that fail, stall, or answer from a script.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use edge_agent::{Agent, AgentConfig, Upstream, UpstreamError, UpstreamFuture};
use shared::{
    Clock, ManualClock, Nanos, RuleSet,
    quota::{DEFAULT_THRESHOLD, EdgeId},
    sim::WireRegional,
    wire::{Acquire, AcquireReply, SyncAck, SyncBatch},
};

/// The start of every test's clock: a round minute, so windows start here.
pub const T0: Nanos = Nanos(1_800_000_000_000_000_000);

pub fn rules(yaml: &str) -> RuleSet {
    RuleSet::from_yaml("rules.yaml", yaml).expect("test rules parse")
}

/// One region's regional, shared by the edges that talk to it.
pub type Regional = Arc<Mutex<WireRegional>>;

pub fn regional(rules: &RuleSet, edges: u32) -> Regional {
    Arc::new(Mutex::new(WireRegional::new(
        rules.clone(),
        edges,
        DEFAULT_THRESHOLD,
    )))
}

/// One edge's link to a shared regional, answering at once, unless cut.
pub struct Link {
    pub regional: Regional,
    pub edge: EdgeId,
    pub clock: ManualClock,
    pub up: AtomicBool,
    pub syncs: AtomicU64,
}

impl Link {
    pub fn new(regional: &Regional, edge: u32, clock: &ManualClock) -> Arc<Link> {
        Arc::new(Link {
            regional: regional.clone(),
            edge: EdgeId(u64::from(edge)),
            clock: clock.clone(),
            up: AtomicBool::new(true),
            syncs: AtomicU64::new(0),
        })
    }
}

impl Upstream for Link {
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let result = if self.up.load(Ordering::SeqCst) {
            let now = self.clock.now();
            Ok(self
                .regional
                .lock()
                .expect("no test panics while holding the lock")
                .sync(self.edge, now, &batch))
        } else {
            Err(UpstreamError::Unreachable("cut".into()))
        };
        Box::pin(async move { result })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let result = if self.up.load(Ordering::SeqCst) {
            let now = self.clock.now();
            Ok(self
                .regional
                .lock()
                .expect("no test panics while holding the lock")
                .acquire(self.edge, now, &request))
        } else {
            Err(UpstreamError::Unreachable("cut".into()))
        };
        Box::pin(async move { result })
    }
}

/// An upstream that never answers (a regional that is up but stalled).
pub struct Stalled;

impl Upstream for Stalled {
    fn sync(&self, _: SyncBatch) -> UpstreamFuture<SyncAck> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(UpstreamError::Timeout)
        })
    }

    fn acquire(&self, _: Acquire) -> UpstreamFuture<AcquireReply> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(UpstreamError::Timeout)
        })
    }
}

/// An upstream that answers exact requests from a script, then fails.
pub struct Scripted {
    pub replies: Mutex<VecDeque<AcquireReply>>,
}

impl Upstream for Scripted {
    fn sync(&self, _: SyncBatch) -> UpstreamFuture<SyncAck> {
        Box::pin(async { Err(UpstreamError::Unreachable("scripted".into())) })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let next = self
            .replies
            .lock()
            .expect("no test panics while holding the lock")
            .pop_front();
        Box::pin(async move {
            match next {
                Some(mut reply) => {
                    reply.request_id = request.request_id;
                    Ok(reply)
                }
                None => Err(UpstreamError::Unreachable("script ended".into())),
            }
        })
    }
}

pub fn agent(rules: &RuleSet, upstream: Arc<dyn Upstream>, clock: &ManualClock) -> Agent {
    agent_with(AgentConfig::default(), rules, upstream, clock)
}

pub fn agent_with(
    config: AgentConfig,
    rules: &RuleSet,
    upstream: Arc<dyn Upstream>,
    clock: &ManualClock,
) -> Agent {
    Agent::builder(config, rules.clone(), upstream)
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("inside a runtime")
}
