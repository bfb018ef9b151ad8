//! What a CDN node writes to rate-limit its requests with the edge agent.
//!
//! Run it with `cargo run -p edge-agent --example embed`. Until the QUIC client to the regional
//! exists (the regional issue), the regional here is the simulator's in-process model behind
//! the same `Upstream` trait; swap `InProcessRegional` for the QUIC client and nothing else
//! changes.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use edge_agent::{
    Agent, AgentConfig, Decision, Identity, IdentityConfig, IpText, Request, SystemClock, Upstream,
    UpstreamFuture,
};
use shared::{
    Clock, RuleSet,
    quota::{DEFAULT_THRESHOLD, EdgeId},
    sim::WireRegional,
    wire::{Acquire, AcquireReply, SyncAck, SyncBatch},
};

const RULES: &str = "\
rate_limits:
  default: { requests_per_minute: 60 }
  endpoints:
    - { path: /api/login, method: POST, limit: 5, window: 1m, key: ip, strictness: hard }
    - { path: /api/search, method: GET, limit: 30, window: 1m, key: user_id }
";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Rules, validated whole before anything runs.
    let rules = RuleSet::from_yaml("rules.yaml", RULES)?;

    // 2. The agent, with its sync loop running in the background.
    let upstream = Arc::new(InProcessRegional(Mutex::new(WireRegional::new(
        rules.clone(),
        1,
        DEFAULT_THRESHOLD,
    ))));
    let agent = Agent::builder(AgentConfig::default(), rules, upstream).build()?;
    let _sync = agent.spawn_sync_loop();

    // 3. Who is asking: headers and the socket, trusting X-Forwarded-For only from our own
    //    load balancers.
    let identity = IdentityConfig {
        trusted_proxies: IdentityConfig::parse_trusted_proxies(["10.0.0.0/8"])?,
        ..IdentityConfig::default()
    };

    // 4. On every request: check, then answer 429 or pass it on with the rate-limit headers.
    let peer: IpAddr = "10.0.0.5".parse()?;
    let headers = [("x-forwarded-for", "203.0.113.7")];
    for attempt in 1..=7 {
        let who = Identity::extract(&identity, peer, &headers);
        let mut ip_text = IpText::default();
        let request = who.fill(
            Request {
                headers: &headers,
                ..Request::new("POST", "/api/login")
            },
            &mut ip_text,
        );
        let decision = agent.check_async(&request, std::num::NonZeroU32::MIN).await;
        println!("attempt {attempt}: {}", respond(&decision));
    }
    Ok(())
}

/// The status line and headers a proxy would send for `decision` (DESIGN §8).
fn respond(d: &Decision) -> String {
    let headers = format!(
        "X-RateLimit-Limit: {}, X-RateLimit-Remaining: {}, X-RateLimit-Reset: {}",
        d.limit,
        d.remaining,
        d.reset_at_secs()
    );
    if d.allowed {
        format!("200 ({headers})")
    } else {
        format!("429 Retry-After: {} ({headers})", d.retry_after_secs())
    }
}

/// The simulator's regional model as an upstream, answering at once.
struct InProcessRegional(Mutex<WireRegional>);

impl Upstream for InProcessRegional {
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck> {
        let ack = self.lock().sync(EdgeId(0), SystemClock.now(), &batch);
        Box::pin(async move { Ok(ack) })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let reply = self.lock().acquire(EdgeId(0), SystemClock.now(), &request);
        Box::pin(async move { Ok(reply) })
    }
}

impl InProcessRegional {
    fn lock(&self) -> std::sync::MutexGuard<'_, WireRegional> {
        // A panic while holding the lock would already have ended this example.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
