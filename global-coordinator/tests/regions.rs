//! Two regions under one coordinator, over real QUIC with mutual TLS: the coordinator as its
//! binary, each regional in-process through the same `app::run` its binary calls (so it can be
//! stopped and counted), and edges as QUIC clients sending exact checks, so every admission is
//! seen one by one.
//!
//! Windows are seconds long, not minutes, so the tests wait seconds: the arithmetic is the same.

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, UdpSocket},
    num::NonZeroU32,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use quinn::{Connection, Endpoint};
use shared::{
    LimitId, RuleSet,
    net::{self, Identity},
    wire::{
        Acquire, AcquireReply, Check, Hello, Message, PROTOCOL_VERSION, Role, SyncBatch, SyncEntry,
    },
};
use system_tests::{
    http::{Reply, request},
    process::Spawned,
};
use tokio::{runtime::Runtime, sync::oneshot, task::JoinHandle};

const BIN: &str = env!("CARGO_BIN_EXE_global-coordinator");
const TOKEN: &str = "s3cret-admin-token-0123456789";
/// The window of the test rule, in seconds.
const WINDOW: u64 = 4;

static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One world at a time: each runs three runtimes and a process on two cores. A starved
/// escalation denies its request by design, which would make the counts flaky; its quota
/// lands for the next ones, so a count comes out exact as long as requests follow it (the
/// regionals' budget here is 300 ms, not the default 100 ms, to keep that the rare case on a
/// loaded machine).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rules(limit: u64) -> String {
    format!(
        "version: 1\nrate_limits:\n  endpoints:\n    - {{ id: login, path: /api/login, method: POST, \
         limit: {limit}, window: {WINDOW}s, algorithm: fixed_window, key: user_id, \
         strictness: hard }}\n"
    )
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

/// A coordinator process, two in-process regionals (eu, us), and an edge client in each.
struct World {
    dir: PathBuf,
    rt: Runtime,
    coordinator: Option<Spawned>,
    admin: SocketAddr,
    regionals: BTreeMap<&'static str, Regional>,
    limit: LimitId,
    quic: u16,
    /// eu's Redis, when it keeps its counts (and its partitions) there; dropped (stopped)
    /// after the regionals.
    redis_eu: Option<(Spawned, u16)>,
    /// Last, so it is released after everything else is dropped.
    _serial: std::sync::MutexGuard<'static, ()>,
}

struct Regional {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    edge: Option<(Endpoint, Connection)>,
}

impl World {
    fn start(tag: &str, limit: u64) -> World {
        World::with_rules(tag, &rules(limit))
    }

    /// A world enforcing `text`, whose first limit the edges' checks name.
    fn with_rules(tag: &str, text: &str) -> World {
        World::build(tag, text, false)
    }

    /// [`World::start`] with eu's regional on a Redis of its own (us's in memory).
    fn with_redis_in_eu(tag: &str, limit: u64) -> World {
        World::build(tag, &rules(limit), true)
    }

    fn build(tag: &str, text: &str, redis_in_eu: bool) -> World {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("rl-regions-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp is writable");
        regional_aggregator::app::pki(
            &dir.join("pki"),
            &[
                "coordinator-1".into(),
                "regional-eu-1".into(),
                "regional-us-1".into(),
                "edge-eu-1".into(),
                "edge-us-1".into(),
            ],
            &["localhost".into()],
        )
        .expect("pki");
        fs::write(dir.join("rules.yaml"), text).expect("writable");
        fs::write(dir.join("admin.token"), TOKEN).expect("writable");
        let quic = free_port();
        fs::write(
            dir.join("coordinator.yaml"),
            format!(
                "node: coordinator-1\nadmin: 127.0.0.1:0\ntoken_file: admin.token\n\
                 state: state/coordinator.json\nrules: rules.yaml\nlisten: 127.0.0.1:{quic}\n\
                 tls: {{ ca: pki/ca.pem, cert: pki/coordinator-1.pem, key: pki/coordinator-1.key }}\n\
                 rebalance_interval: 200ms\n\
                 regions:\n  - {{ name: eu, floor: 0.1 }}\n  - {{ name: us, floor: 0.1 }}\n"
            ),
        )
        .expect("writable");
        let rules = RuleSet::from_yaml("rules", text).expect("valid rules");
        let limit = rules
            .limits()
            .next()
            .map(|(_, l)| l.id())
            .expect("one limit");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut world = World {
            dir,
            rt,
            coordinator: None,
            admin: "127.0.0.1:1".parse().expect("addr"),
            regionals: BTreeMap::new(),
            limit,
            quic,
            redis_eu: redis_in_eu.then(start_redis),
            _serial: serial,
        };
        world.start_coordinator(quic);
        for region in ["eu", "us"] {
            world.start_regional(region, quic);
        }
        world.wait_until_both_regions_hold_quota();
        world
    }

    /// The coordinator's QUIC port, from its config.
    fn coordinator_quic(&self) -> u16 {
        self.quic
    }

    fn start_coordinator(&mut self, _quic: u16) {
        let mut c = Spawned::start(
            Command::new(BIN)
                .arg("--config")
                .arg(self.dir.join("coordinator.yaml"))
                .args(["--log", "global_coordinator=debug"])
                .env_remove("COORDINATOR_TOKEN"),
        );
        self.admin = c.logged_addr("admin");
        self.coordinator = Some(c);
    }

    /// What the coordinator printed so far.
    fn log(&mut self) -> String {
        self.coordinator
            .as_mut()
            .map_or(String::new(), Spawned::printed)
    }

    fn kill_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.kill();
        }
    }

    fn start_regional(&mut self, region: &'static str, quic: u16) {
        let node = format!("regional-{region}-1");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = self.dir.join(format!("{node}.yaml"));
        let redis = match &self.redis_eu {
            // A store call may take seconds before the breaker takes over: long enough for a
            // test to stall this Redis on purpose (`CLIENT PAUSE`).
            Some((_, port)) if region == "eu" => {
                format!("redis: {{ url: \"redis://127.0.0.1:{port}\", timeout: 3s }}\n")
            }
            _ => String::new(),
        };
        fs::write(
            &config,
            format!(
                "node: {node}\nregion: {region}\nlisten: {listen}\nrules: rules.yaml\n\
                 tls: {{ ca: pki/ca.pem, cert: pki/{node}.pem, key: pki/{node}.key }}\n\
                 coordinator: {{ addr: 127.0.0.1:{quic}, name: coordinator-1, \
                 report_interval: 200ms, escalation_budget: 300ms }}\n{redis}"
            ),
        )
        .expect("writable");
        let checked = regional_aggregator::app::check(&config, None).expect("valid config");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = self.rt.spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = regional_aggregator::app::run(checked, shutdown).await {
                panic!("regional stopped: {e}");
            }
        });
        let edge = self.rt.block_on(edge(&self.dir, region, listen));
        self.regionals.insert(
            region,
            Regional {
                stop: Some(stop),
                task: Some(task),
                edge: Some(edge),
            },
        );
    }

    /// Stops `region`'s regional (and its edge client) and starts it again from its config.
    fn restart_regional(&mut self, region: &'static str) {
        if let Some(mut r) = self.regionals.remove(region) {
            assert!(r.stop(&self.rt), "{region}'s regional did not stop");
        }
        let quic = self.quic;
        self.start_regional(region, quic);
    }

    fn api(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let r: Reply = request(
            self.admin,
            method,
            path,
            &format!("authorization: Bearer {TOKEN}\r\n"),
            body.as_bytes(),
        );
        assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.body);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
    }

    /// Pins `login` to `eu` and `us` of the limit (in force from a later window).
    fn pin(&self, eu: f64, us: f64) {
        self.api(
            "POST",
            "/api/v1/partitions/login/pin",
            &format!(r#"{{"eu": {eu}, "us": {us}}}"#),
        );
    }

    /// Each region's share of `login` as the coordinator holds it, in ppm.
    fn shares(&self) -> BTreeMap<String, u64> {
        let p = self.api("GET", "/api/v1/partitions", "");
        ["eu", "us"]
            .iter()
            .map(|r| {
                let f = p["rules"][0]["shares"][r].as_f64().expect("a share");
                (r.to_string(), (f * 1e6).round() as u64)
            })
            .collect()
    }

    /// Sends `n` exact checks of `cost` 1 for `key` through region `region`'s edge, 25 at a
    /// time; returns how many were admitted, by the window (its end) they were decided in.
    fn send(&self, region: &str, key: &str, n: usize) -> BTreeMap<u64, u64> {
        let (_, conn) = self.regionals[region].edge.as_ref().expect("an edge");
        let limit = self.limit;
        self.rt.block_on(async {
            let mut admitted = BTreeMap::new();
            let mut denied_once = false;
            let mut left = n;
            while left > 0 {
                let batch = left.min(25);
                left -= batch;
                let calls = (0..batch).map(|_| {
                    // Unique per edge: a repeated id is a resend, answered from memory.
                    let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let request = Message::from(Acquire {
                        request_id: id,
                        checks: vec![Check {
                            limit,
                            key: key.into(),
                            window: window_now(),
                            cost: NonZeroU32::MIN,
                            want: 0,
                        }],
                    });
                    async move { net::call(conn, &request).await }
                });
                for reply in futures_util::future::join_all(calls).await {
                    match reply {
                        Ok(Message::AcquireReply(r)) => {
                            if !r.allowed && std::env::var_os("RL_DEBUG").is_some() && !denied_once
                            {
                                denied_once = true;
                                let so_far: u64 = admitted.values().sum();
                                eprintln!(
                                    "denied after {so_far} of {n} in {region}: {r:?} at {:?}",
                                    SystemTime::now()
                                );
                            }
                            if r.allowed {
                                *admitted
                                    .entry(r.reset_at.as_u64() / 1_000_000_000)
                                    .or_insert(0) += 1;
                            }
                        }
                        other => panic!("an exact check failed: {other:?}"),
                    }
                }
            }
            admitted
        })
    }

    fn admitted(&self, region: &str, key: &str, n: usize) -> u64 {
        self.send(region, key, n).values().sum()
    }

    /// Both regionals connected, reporting, and holding a share: one check each on a spare
    /// key is admitted.
    fn wait_until_both_regions_hold_quota(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for region in ["eu", "us"] {
            while self.admitted(region, &format!("warm-{region}"), 1) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "{region} never held quota: {}",
                    self.api("GET", "/api/v1/regions", "")
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Regional {
    /// Closes its edge client and stops it, on `rt`; whether it stopped within 5 s.
    fn stop(&mut self, rt: &Runtime) -> bool {
        if let Some((endpoint, conn)) = self.edge.take() {
            conn.close(0u32.into(), b"");
            drop(endpoint);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().is_none_or(|task| {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
                .is_ok()
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for r in self.regionals.values_mut() {
            r.stop(&self.rt);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway `redis-server` on a free port (tests/run.sh installs it), once it accepts
/// connections: the process and its port.
fn start_redis() -> (Spawned, u16) {
    let port = free_port();
    let redis = Spawned::start(Command::new("redis-server").args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (redis, port)
}

/// An edge of `region` connected to the regional at `addr`.
async fn edge(dir: &Path, region: &str, addr: SocketAddr) -> (Endpoint, Connection) {
    let node = format!("edge-{region}-1");
    let pki = dir.join("pki");
    let identity = Identity::from_files(
        pki.join("ca.pem"),
        pki.join(format!("{node}.pem")),
        pki.join(format!("{node}.key")),
    )
    .expect("identity");
    let endpoint =
        net::client_endpoint("127.0.0.1:0".parse().expect("addr"), &identity).expect("endpoint");
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: node.clone(),
        incarnation: 1,
        role: Role::Edge,
        region: region.into(),
        rule_set_version: u64::MAX,
        // This client waits as long as an answer takes: the regional keeps its own budget.
        answer_within_ms: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match net::connect(&endpoint, addr, &format!("regional-{region}-1"), &hello).await {
            Ok((conn, _)) => return (endpoint, conn),
            Err(e) => {
                assert!(Instant::now() < deadline, "edge cannot connect: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn window_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / WINDOW)
}

/// Sleeps until a window has just begun (at least `room` of it left).
fn wait_for_window_start(room: Duration) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        let into =
            Duration::from_nanos((now.as_nanos() % (u128::from(WINDOW) * 1_000_000_000)) as u64);
        let left = Duration::from_secs(WINDOW) - into;
        if into < Duration::from_millis(100) && left >= room {
            return;
        }
        std::thread::sleep(
            left.min(Duration::from_millis(20))
                .max(Duration::from_millis(1)),
        );
    }
}

/// Seed 004's uneven traffic, across regions: a hard limit of 1,000 per window; 500 requests
/// for one user in eu and 500 in us, then, after the window turns, 1,000 more to eu alone.
/// Each window admits exactly 1,000: the second one's second half only because eu escalates
/// and us releases what it does not use.
#[test]
fn uneven_traffic_across_regions_gets_exactly_the_global_limit() {
    let mut world = World::start("seed004", 1000);

    wait_for_window_start(Duration::from_secs(3));
    let first = window_now();
    let eu = world.admitted("eu", "alice", 500);
    let us = world.admitted("us", "alice", 500);
    let extra = world.admitted("eu", "alice", 50) + world.admitted("us", "alice", 50);
    assert_eq!(
        window_now(),
        first,
        "the first window lasted the whole round"
    );
    // Which region admits which of them depends on where the shares stood (they follow
    // demand); the window as a whole admits exactly the limit.
    assert_eq!(
        eu + us + extra,
        1000,
        "window one: 1,000 of 1,100 (eu {eu}, us {us}, then {extra} more)"
    );
    assert!(
        eu >= 450 && us >= 450,
        "each region got about its half: eu {eu}, us {us}"
    );

    wait_for_window_start(Duration::from_secs(3));
    let second = window_now();
    let eu = world.admitted("eu", "alice", 1000);
    let beyond = world.admitted("eu", "alice", 20) + world.admitted("us", "alice", 20);
    assert_eq!(
        window_now(),
        second,
        "the second window lasted the whole round"
    );
    assert_eq!(
        (eu, beyond),
        (1000, 0),
        "window two (a fixed window: nothing carried): all 1,000 in eu although its share \
         was about half, none beyond: {}\n{}",
        world.api("GET", "/api/v1/debug/alice", ""),
        world.log()
    );
    let metrics = world.api("GET", "/api/v1/metrics", "");
    assert!(metrics.is_object());
}

/// A giver whose confirm comes after the requester was answered: eu's Redis is paused while
/// us escalates, so eu releases for us only after the coordinator stopped waiting for it. The
/// coordinator asks eu again with the same transfer id, eu answers what it released, and us
/// gets it as a `TransferGrant`: the window still admits exactly the limit, all of it in us.
/// Without the second ask, what eu released would be nobody's until the window ends.
#[test]
fn a_release_confirmed_late_still_reaches_the_region_that_asked() {
    let world = World::with_redis_in_eu("late-confirm", 100);
    let (_, eu_redis) = world
        .redis_eu
        .as_ref()
        .expect("eu keeps its counts in Redis");
    let eu_redis = *eu_redis;
    // Half each, so that us's part is spent after 50 (a pin is in force from a window on).
    world.pin(0.5, 0.5);
    std::thread::sleep(Duration::from_secs(2));
    wait_for_window_start(Duration::from_secs(3));
    let window = window_now();
    let mut us = world.admitted("us", "carol", 50);
    assert_eq!(us, 50, "us's own part");
    // Every command on eu's Redis now waits 1.3 s, past the 1 s the coordinator waits for a
    // confirm; the next escalation's release in eu waits with them.
    let mut redis = std::net::TcpStream::connect(("127.0.0.1", eu_redis)).expect("eu's Redis");
    std::io::Write::write_all(&mut redis, b"CLIENT PAUSE 1300 ALL\r\n").expect("written");
    let mut ok = [0u8; 5];
    std::io::Read::read_exact(&mut redis, &mut ok).expect("Redis answers the pause");
    assert_eq!(&ok, b"+OK\r\n");
    let paused = Instant::now();
    us += world.admitted("us", "carol", 1);
    // The pause ends, eu's release goes through, the coordinator's second ask is answered and
    // its grant lands in us.
    std::thread::sleep(Duration::from_millis(1800).saturating_sub(paused.elapsed()));
    // Each batch of 25 escalates once (its other denials wait for that one) for a twentieth of
    // the limit: enough batches to take all that eu has left.
    us += world.admitted("us", "carol", 250);
    assert_eq!(window_now(), window, "the round lasted one window");
    let metrics = world.api("GET", "/api/v1/metrics", "");
    assert_eq!(
        us,
        100,
        "us admitted {us} of carol's 100, all of the limit being asked for there\n{metrics}\n{}",
        world.api("GET", "/api/v1/debug/carol", "")
    );
    let late = metrics["late_released_units"]
        .as_u64()
        .expect("the counter");
    assert!(late > 0, "no release was confirmed late: {metrics}");
}

/// One exact check of `key` in `region` under the world's limit, asking to hold `want` more
/// as a grant; the reply.
fn acquire(world: &World, region: &str, key: &str, window: u64, want: u64) -> AcquireReply {
    let (_, conn) = world.regionals[region].edge.as_ref().expect("an edge");
    let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request = Message::from(Acquire {
        request_id: id,
        checks: vec![Check {
            limit: world.limit,
            key: key.into(),
            window,
            cost: NonZeroU32::MIN,
            want,
        }],
    });
    match world.rt.block_on(net::call(conn, &request)) {
        Ok(Message::AcquireReply(r)) => r,
        other => panic!("an exact check failed: {other:?}"),
    }
}

/// A key's quota split across regions, whose other region's edge holds the rest unused as a
/// grant: escalation cannot move a grant, so eu's denial is refused. The edge is told to ask
/// again within `ESCALATION_RETRY`, not at the window's end (an hour here); once us's edge
/// hands its grant back (as an idle edge does), eu's next escalation moves it and eu admits.
#[test]
fn a_denial_no_region_could_help_is_asked_again_soon() {
    const HOUR: &str = "version: 1\nrate_limits:\n  endpoints:\n    - { id: login, path: /api/login, \
        method: POST, limit: 10, window: 1h, algorithm: fixed_window, key: user_id, \
        strictness: hard }\n";
    let world = World::with_rules("retry", HOUR);
    let retry = regional_aggregator::regional::ESCALATION_RETRY;
    // At least a minute left in the hour, so the window's end is far beyond the retry.
    let hour = loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        if 3600 - now % 3600 > 60 {
            break now / 3600;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    // us admits one and takes what it may as a grant for its edge, which it does not use.
    let first = acquire(&world, "us", "dave", hour, 10);
    assert!(first.allowed, "{first:?}");
    let held = first.checks[0].granted;
    assert!(held > 0, "us's edge holds a grant: {first:?}");
    // eu spends its part and what us can release; then it is refused.
    let mut eu = 0;
    let denied = loop {
        let r = acquire(&world, "eu", "dave", hour, 0);
        if !r.allowed {
            break r;
        }
        eu += 1;
        assert!(
            eu < 10,
            "eu admitted all of the limit while us held part of it"
        );
    };
    assert!(
        denied.retry_after > shared::Nanos::ZERO && denied.retry_after <= retry.into(),
        "asked again within {retry:?}, not at the hour's end: {denied:?}\n{}",
        world.api("GET", "/api/v1/debug/dave", "")
    );
    // us's edge goes idle and hands its grant back; eu's next try gets it.
    let (_, us) = world.regionals["us"].edge.as_ref().expect("an edge");
    let back = Message::from(SyncBatch {
        entries: vec![SyncEntry {
            limit: world.limit,
            key: "dave".into(),
            window: hour,
            used: 0,
            released: held,
            want: 0,
        }],
    });
    match world.rt.block_on(net::call(us, &back)) {
        Ok(Message::SyncAck(_)) => {}
        other => panic!("the sync failed: {other:?}"),
    }
    let mut more = 0;
    while acquire(&world, "eu", "dave", hour, 0).allowed {
        more += 1;
        assert!(1 + eu + more <= 10, "past the limit");
    }
    assert!(
        more > 0,
        "what us's edge handed back reached eu: {}",
        world.api("GET", "/api/v1/debug/dave", "")
    );
}

/// Admitted per window, summed over regions.
fn merge(into: &mut BTreeMap<u64, u64>, from: BTreeMap<u64, u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

/// Demand moves from eu to us on one hard key: us's share grows within a few report
/// intervals, and in every window the two regions together admit at most the limit, share
/// moves and escalations included.
#[test]
fn shares_follow_demand_and_the_hard_limit_holds_globally() {
    let world = World::start("demand", 400);
    let mut by_window = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        merge(&mut by_window, world.send("eu", "hot", 25));
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_eu = world.shares();
    assert!(
        after_eu["eu"] > 600_000,
        "eu's share grew with its demand: {after_eu:?}"
    );

    let start = Instant::now();
    let mut moved = None;
    while start.elapsed() < Duration::from_secs(6) {
        merge(&mut by_window, world.send("us", "hot", 25));
        if moved.is_none() && world.shares()["us"] > 600_000 {
            moved = Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = moved.unwrap_or_else(|| panic!("us's share never grew: {:?}", world.shares()));
    assert!(
        moved < Duration::from_secs(4),
        "us's share took {moved:?} to grow"
    );
    assert!(by_window.len() >= 2, "{by_window:?}");
    for (window_end, n) in &by_window {
        assert!(
            *n <= 400,
            "window ending {window_end}: {n} admitted across regions, limit 400"
        );
    }
    assert!(
        by_window.values().filter(|&&n| n == 400).count() >= 1,
        "at least one full window admitted the whole limit: {by_window:?}"
    );
}

/// A pin holds a rule's shares whatever the demand; unpinned, they follow demand again.
#[test]
fn a_pin_holds_under_skewed_demand_and_unpin_lets_it_follow() {
    let world = World::start("pin", 1000);
    world.pin(0.3, 0.7);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        world.send("eu", &format!("u{}", start.elapsed().as_millis() % 50), 10);
    }
    let shares = world.shares();
    assert_eq!((shares["eu"], shares["us"]), (300_000, 700_000), "pinned");
    // The regions hold the pin: a fresh key admits exactly eu's 300 there, once us has
    // nothing to give (a second key in us takes us's 700 first).
    wait_for_window_start(Duration::from_secs(3));
    assert_eq!(world.admitted("us", "fresh", 700), 700);
    assert_eq!(
        world.admitted("eu", "fresh", 400),
        300,
        "eu's partition is the pinned 30 %"
    );

    world.api("DELETE", "/api/v1/partitions/login/pin", "");
    let start = Instant::now();
    while world.shares()["eu"] < 600_000 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "unpinned, eu's share never followed its demand: {:?}",
            world.shares()
        );
        world.send("eu", &format!("u{}", start.elapsed().as_millis() % 50), 10);
    }
}

/// A key hot in one region gets a per-key partition for the next window that follows its own
/// demand: eu used 600 of one user's 1,000 (us none of it), so in the next window eu holds
/// 900 of that key (its 10 % floor left to us) before it asks for anything, while the rule's
/// shares stay even because us's demand for other users balances it.
#[test]
fn a_hot_key_gets_a_partition_that_follows_its_own_demand() {
    let world = World::start("hot", 1000);
    wait_for_window_start(Duration::from_secs(3));
    assert_eq!(world.admitted("eu", "hot", 600), 600);
    assert_eq!(world.admitted("us", "other", 600), 600);
    wait_for_window_start(Duration::from_secs(3));
    let moves = || {
        let r = request(world.admin, "GET", "/metrics", "", b"");
        system_tests::metrics::parse(&r.body)
            .expect("the coordinator's metrics parse")
            .get("coordinator_hot_key_moves_total", &[])
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    // Two keys are hot, each in its own region ("hot" in eu, "other" in us), and the
    // coordinator splits them one after the other, in no set order: wait for both.
    while moves() < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the hot key was never split by its demand"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(world.admitted("eu", "hot", 1), 1);
    let debug = world.api("GET", "/api/v1/debug/hot", "");
    // What each region can still admit of the key: its partition less what it used (a giver
    // releases by consuming on its own exact path).
    let room = |region: &str| {
        let h = &debug["regions"][region]["holdings"][0];
        let (p, used) = (h["partition"].as_u64(), h["used"].as_u64());
        p.zip(used)
            .map(|(p, used)| p - used)
            .unwrap_or_else(|| panic!("{region} holds the key: {debug}"))
    };
    assert_eq!(room("eu"), 899, "{debug}");
    assert_eq!(room("us"), 100, "{debug}");
    // The whole limit still: eu gets the rest by escalation, and no more anywhere.
    assert_eq!(world.admitted("eu", "hot", 1100), 999);
    assert_eq!(world.admitted("us", "hot", 20), 0);
}

/// A regional restarted while the coordinator is down carries on with its last partitions:
/// it keeps them in its Redis after every push and takes them back at start. Under a 70/30
/// pin, a fresh key in eu admits its 700 after the restart; a regional that started from
/// nothing would hold nothing until the coordinator's first push, and admit none.
#[test]
fn a_regional_restarted_while_the_coordinator_is_down_keeps_its_partitions() {
    let mut world = World::with_redis_in_eu("restart", 1000);
    world.pin(0.7, 0.3);
    // In force once eu holds 700 of a fresh key (from the next window at the latest): what
    // eu reports for a key it has seen once, before any escalation for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut probe = 0;
    loop {
        probe += 1;
        let key = format!("probe-{probe}");
        assert_eq!(world.admitted("eu", &key, 1), 1);
        let debug = world.api("GET", &format!("/api/v1/debug/{key}"), "");
        if debug["regions"]["eu"]["holdings"][0]["partition"].as_u64() == Some(700) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "eu never held its pinned 700: {debug}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The push that put it in force is written to Redis right after it applied, in the same
    // handler; the debug query above may have raced that write by a few milliseconds.
    std::thread::sleep(Duration::from_millis(300));
    world.kill_coordinator();
    world.restart_regional("eu");
    assert_eq!(
        world.admitted("eu", "after-restart", 800),
        700,
        "eu's partition after a restart with the coordinator down (no escalation either)"
    );
}

/// A world enforcing one hard token bucket, `login`, of `burst` at 20/s, with a 50/50 pin
/// asked for (in force a little later: see the tests).
fn bucket_world(tag: &str, burst: u64) -> World {
    let world = World::with_rules(
        tag,
        &format!(
            "version: 1\nrate_limits:\n  endpoints:\n    - {{ id: login, path: /api/login, \
             method: POST, algorithm: token_bucket, rate: 20/s, burst: {burst}, \
             key: user_id, strictness: hard }}\n"
        ),
    );
    world.pin(0.5, 0.5);
    world
}

/// A token bucket is split as capacity and rate, and shares move without a burst. Of a bucket
/// of 40 at 20/s pinned 50/50, each region holds 20 at 10/s. us spends alice's bucket (its
/// part, and what escalation takes from eu's), then a 75/25 pin moves capacity to eu: us's
/// cut applies at once, but eu's raise waits one refill time (2 s), so eu's part of alice does
/// not grow by 10 while what us spent refills (which would admit 50 across regions where the
/// bucket allows 40 and its rate). After the refill time eu's part of a fresh key is 30, and
/// one key across both regions is still the bucket's 40.
#[test]
fn a_token_bucket_is_split_between_regions_as_capacity_and_rate() {
    // Even, whatever the warm-up's demand made of the shares; in force once a fresh key's
    // part in each region is 20 (a raise waits out the refill time after the cut that makes
    // room for it, and that cut may itself wait for a raise still to come).
    let world = bucket_world("bucket", 40);
    let probes = std::cell::Cell::new(0);
    let wait_for_part = |region: &str, part: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            probes.set(probes.get() + 1);
            let probe = format!("probe-{}", probes.get());
            if world.admitted(region, &probe, part as usize + 1) >= part {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{region}'s part never became {part}: {}",
                world.api("GET", "/api/v1/partitions", "")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for_part("eu", 20);
    wait_for_part("us", 20);
    let start = Instant::now();
    let spent = world.admitted("us", "alice", 30) as f64;
    world.pin(0.75, 0.25);
    let eu = world.admitted("eu", "alice", 40) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        spent >= 20.0,
        "us spent {spent} of alice, less than its own 20"
    );
    assert!(
        eu <= 20.0 + 10.0 * elapsed + 1.0 && spent + eu <= 40.0 + 20.0 * elapsed + 1.0,
        "us spent {spent} and eu admitted {eu} of alice in {elapsed:.2}s: eu's raise to 30 \
         applied before what us spent refilled"
    );
    // Then the pin comes into force.
    // eu's first burst shows its part. Tokens escalation moved may land after a burst that
    // asked for them (the ask runs in the background), so they are collected by a second
    // round; the pause before it refills more than any transfer still in flight could hold.
    wait_for_part("eu", 30);
    let start = Instant::now();
    let eu = world.admitted("eu", "carol", 80) as f64;
    let us = world.admitted("us", "carol", 80) as f64;
    std::thread::sleep(Duration::from_millis(300));
    let later = (world.admitted("eu", "carol", 80) + world.admitted("us", "carol", 80)) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    let total = eu + us + later;
    assert!(
        eu >= 30.0 && total >= 40.0 && total <= 40.0 + 20.0 * elapsed + 1.0,
        "eu admitted {eu} and us {us} of carol, then {later} more, in {elapsed:.2}s, of a \
         bucket of 40 at 20/s, eu's part 30: {}",
        world.api("GET", "/api/v1/debug/carol", "")
    );
}

/// A user who sends all of a bucket's traffic to one region gets more than that region's part:
/// the region escalates when its part of the key's bucket is empty, and the other region
/// gives up tokens from its part (not capacity: the sum of both parts' levels never grows).
/// Of a bucket of 400 at 20/s pinned 50/50, eu admits well over its own 200 for bob, and eu and
/// us together never more than the bucket's 400 and its rate.
#[test]
fn a_bucket_key_spent_in_one_region_escalates_for_the_others_tokens() {
    let world = bucket_world("bucket-escalation", 400);
    // In force once a fresh key's part in each region is 200 (see the test above).
    let deadline = Instant::now() + Duration::from_secs(10);
    for (probe, region) in ["eu", "us"].into_iter().enumerate() {
        while world.admitted(region, &format!("probe-{probe}"), 150) < 150 {
            assert!(Instant::now() < deadline, "{region} never held half");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let start = Instant::now();
    let eu = world.admitted("eu", "bob", 600) as f64;
    let us = world.admitted("us", "bob", 300) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("bucket escalation: eu {eu}, us {us} of bob in {elapsed:.2}s");
    assert!(
        eu >= 300.0,
        "eu admitted {eu} of bob's 600: little more than its own part of 200, so us's tokens \
         did not come"
    );
    assert!(
        eu + us <= 400.0 + 20.0 * elapsed + 1.0,
        "eu {eu} and us {us} admitted for bob in {elapsed:.2}s, past the bucket's 400 at 20/s"
    );
}

/// The coordinator killed mid-load: both regions keep deciding on their last partitions (and
/// never past them: nothing can be transferred); restarted, it has the same rules, pins and
/// shares, and the regions reconnect.
#[test]
fn regions_keep_deciding_while_the_coordinator_is_down() {
    let mut world = World::start("killed", 1000);
    world.pin(0.4, 0.6);
    // Wait until eu holds the pin (a raise waits for us's cut to be confirmed).
    std::thread::sleep(Duration::from_millis(800));
    let before = world.api("GET", "/api/v1/partitions", "");
    world.kill_coordinator();

    wait_for_window_start(Duration::from_secs(3));
    assert_eq!(
        world.admitted("eu", "bob", 500),
        400,
        "eu alone: its 40 %, no transfer"
    );
    assert_eq!(world.admitted("us", "bob", 700), 600, "us alone: its 60 %");

    let quic = world.coordinator_quic();
    world.start_coordinator(quic);
    let mut after = world.api("GET", "/api/v1/partitions", "");
    // Demand is relearnt from reports, not kept: compare everything else.
    let mut before = before;
    for p in [&mut before, &mut after] {
        if let Some(rule) = p["rules"][0].as_object_mut() {
            rule.remove("demand_per_second");
        }
    }
    assert_eq!(after, before, "rules, pins and shares survive the restart");
    let start = Instant::now();
    loop {
        let regions = world.api("GET", "/api/v1/regions", "");
        let connected = regions["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["connected"] == true && !r["last_report_age_seconds"].is_null())
            .count();
        if connected == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "regions did not come back: {regions}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
