//! The coordinator's state and every change to it: the rule set, operators' pins, and each
//! region's share of every rule, kept durable in one file.
//!
//! A change flows like this: validate (a rule set is parsed whole, so one bad rule refuses
//! all of it), compute the new state beside the old one, write it to a temporary file, sync
//! it, rename it over the state file, sync the directory, and only then make it the state in
//! force. A crash at any point leaves either the old file or the new one, never half of one;
//! a write that fails leaves the running state as it was and says why.
//!
//! Shares are per rule, in parts per million of each of its limits, from
//! [`shared::quota::split`]: pins first, then each region's floor, then the rest by
//! smoothed demand (equally while no region has reported any). Demand comes from the regions'
//! reports; [`Coordinator::follow_demand`] moves shares when it has moved enough. What each
//! region confirmed it holds is kept here too ([`Coordinator::held`]): the link to the
//! regions raises a share only when the others' confirmed holdings leave room for it. A region's partition of a limit `L` is
//! its share of `L`, apportioned so that `Σ_r P_r = L` exactly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};
use shared::{
    ConfigError, RuleSet,
    quota::{DemandSmoother, RegionShare, split},
};

use crate::config::RegionConfig;

/// Parts per million: a whole limit.
pub const WHOLE: u32 = 1_000_000;

/// What went wrong with a change. Each says what and where; none leaves state half-changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The rule set was refused; the running one stays.
    #[error("{0}")]
    Rules(#[from] ConfigError),
    /// No rule has this id.
    #[error("no rule {0:?}")]
    NoSuchRule(String),
    /// A request was refused (a pin out of range, a body that is not what it should be).
    #[error("{0}")]
    Invalid(String),
    /// The state file could not be written; nothing changed.
    #[error("cannot write the state file {path}: {source}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why the state could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The state file exists but cannot be read or is not ours.
    #[error("state file {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The first rule set was refused.
    #[error("{0}")]
    Rules(#[from] ConfigError),
    /// The first state could not be written.
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// The durable state, as written to the state file (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Durable {
    /// The rule set's version, stamped here: every accepted change adds one.
    version: u64,
    /// The rule set's YAML, as accepted.
    rules: String,
    /// Operators' pins: rule id → region → share in ppm.
    pins: BTreeMap<String, BTreeMap<String, u32>>,
    /// The shares in force: rule id → region → share in ppm.
    shares: BTreeMap<String, BTreeMap<String, u32>>,
    /// What each regional last confirmed it holds: region → node → limit id → (share in ppm,
    /// first window). Kept across restarts so that a coordinator that comes back before a
    /// region reconnects still counts what that region may be admitting.
    #[serde(default)]
    held: BTreeMap<String, BTreeMap<String, Held>>,
}

/// What one region holds of each limit: limit id → (share in ppm, the window it applies from).
pub type Held = BTreeMap<u64, (u32, u64)>;

/// One region's share of one rule, in ppm; absent regions hold nothing.
pub type Shares = BTreeMap<String, u32>;

/// The coordinator's state. Every method takes `&self`; changes are serialized by one lock
/// held across the file write, so two operators' changes cannot interleave.
pub struct Coordinator {
    path: PathBuf,
    regions: Vec<RegionConfig>,
    state: Mutex<Live>,
    /// Smoothed demand per (rule id, region), in cost units per second. Not durable: a
    /// restarted coordinator relearns it from the next reports.
    demand: Mutex<BTreeMap<(String, String), DemandSmoother>>,
}

/// The weight of each new demand sample: 0.3, so demand that moved shows within a few reports.
pub const DEMAND_ALPHA_PPM: u32 = 300_000;

/// Shares are recomputed from demand only when one moves by more than this (2 % of the limit),
/// so noise in the reports does not rewrite the state file and push partitions every interval.
pub const REBALANCE_STEP_PPM: u32 = 20_000;

struct Live {
    durable: Durable,
    rules: Arc<RuleSet>,
}

/// What applying a rule set changed (or would change, on a dry run).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Diff {
    /// Rule ids new in the set.
    pub added: Vec<String>,
    /// Rule ids no longer in it.
    pub removed: Vec<String>,
    /// Rule ids whose definition changed.
    pub changed: Vec<String>,
}

impl Diff {
    /// Nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Coordinator {
    /// Opens the state at `path`, or, when there is none yet, starts from `first` (the rules
    /// file) and writes it.
    ///
    /// # Errors
    ///
    /// A state file that cannot be read, is not ours, or holds rules that no longer validate;
    /// a first state that cannot be written.
    pub fn open(
        path: &Path,
        regions: Vec<RegionConfig>,
        first: impl FnOnce() -> Result<RuleSet, ConfigError>,
    ) -> Result<Coordinator, LoadError> {
        let state_error = |reason: String| LoadError::State {
            path: path.to_owned(),
            reason,
        };
        let coordinator = |durable: Durable, rules: RuleSet| Coordinator {
            path: path.to_owned(),
            regions: regions.clone(),
            state: Mutex::new(Live {
                durable,
                rules: Arc::new(rules),
            }),
            demand: Mutex::new(BTreeMap::new()),
        };
        match fs::read(path) {
            Ok(bytes) => {
                let durable: Durable = serde_json::from_slice(&bytes)
                    .map_err(|e| state_error(format!("not a coordinator state file: {e}")))?;
                let rules =
                    RuleSet::from_yaml(&format!("{} (rules)", path.display()), &durable.rules)
                        .map_err(|e| state_error(e.to_string()))?
                        .with_version(durable.version);
                Ok(coordinator(durable, rules))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rules = first()?;
                let version = rules.version().max(1);
                let mut durable = Durable {
                    version,
                    rules: rules.source().to_owned(),
                    pins: BTreeMap::new(),
                    shares: BTreeMap::new(),
                    held: BTreeMap::new(),
                };
                let rules = rules.with_version(version);
                durable.shares = shares_for(&rules, &regions, &durable.pins, &BTreeMap::new());
                write_atomically(path, &durable)?;
                Ok(coordinator(durable, rules))
            }
            Err(e) => Err(state_error(format!("cannot read it: {e}"))),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // The state is replaced whole under the lock, so a panic elsewhere cannot leave it
        // half-changed: the value inside is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rule set in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.live().rules.clone()
    }

    /// The regions, as configured.
    pub fn regions(&self) -> &[RegionConfig] {
        &self.regions
    }

    /// Per rule id, the shares in force and whether they are pinned.
    pub fn shares(&self) -> BTreeMap<String, (Shares, bool)> {
        let live = self.live();
        live.durable
            .shares
            .iter()
            .map(|(rule, shares)| {
                (
                    rule.clone(),
                    (shares.clone(), live.durable.pins.contains_key(rule)),
                )
            })
            .collect()
    }

    /// Region `region`'s partition of a limit of `value` under `shares`.
    pub fn partition(shares: &Shares, value: u64) -> BTreeMap<String, u64> {
        let names: Vec<&String> = shares.keys().collect();
        let pinned: Vec<RegionShare> = shares
            .values()
            .map(|&ppm| RegionShare {
                pinned_ppm: Some(ppm),
                ..RegionShare::default()
            })
            .collect();
        names
            .into_iter()
            .cloned()
            .zip(split(value, &pinned))
            .collect()
    }

    /// Validates `yaml` as a whole rule set and, unless `dry_run`, makes it the one in force
    /// under the next version. Pins of rules that are gone are dropped.
    ///
    /// # Errors
    ///
    /// [`ChangeError::Rules`] with the located problem (nothing changes), or
    /// [`ChangeError::Write`].
    pub fn apply(&self, yaml: &str, dry_run: bool) -> Result<(u64, Diff), ChangeError> {
        let mut live = self.live();
        self.apply_locked(&mut live, yaml, dry_run)
    }

    fn apply_locked(
        &self,
        live: &mut Live,
        yaml: &str,
        dry_run: bool,
    ) -> Result<(u64, Diff), ChangeError> {
        let rules = RuleSet::from_yaml("rate-limits", yaml)?;
        let diff = diff(&live.rules, &rules);
        if dry_run {
            return Ok((live.durable.version, diff));
        }
        let mut durable = live.durable.clone();
        durable.version += 1;
        durable.rules = yaml.to_owned();
        let rules = rules.with_version(durable.version);
        durable.pins.retain(|id, _| rules.rule(id).is_some());
        durable.shares = shares_for(&rules, &self.regions, &durable.pins, &self.demand_now());
        self.commit(live, durable, rules)?;
        Ok((live.durable.version, diff))
    }

    /// Removes rule `id` from the rule set (a new version).
    ///
    /// # Errors
    ///
    /// [`ChangeError::NoSuchRule`], or a rule set that would no longer validate without it.
    pub fn delete(&self, id: &str) -> Result<u64, ChangeError> {
        // One lock from reading the text to writing the new set, so a change landing between
        // the two cannot be lost.
        let mut live = self.live();
        let index = live
            .rules
            .rules()
            .iter()
            .position(|r| r.id() == id)
            .ok_or_else(|| ChangeError::NoSuchRule(id.to_owned()))?;
        let yaml = without_rule(&live.durable.rules, &live.rules, index, id)?;
        self.apply_locked(&mut live, &yaml, false)
            .map(|(version, _)| version)
    }

    /// Pins rule `id`'s shares: `fractions` by region (each in [0, 1], summing to at most 1;
    /// regions left out get nothing).
    ///
    /// # Errors
    ///
    /// An unknown rule or region, or fractions out of range.
    pub fn pin(&self, id: &str, fractions: &BTreeMap<String, f64>) -> Result<Shares, ChangeError> {
        let mut pin = Shares::new();
        for (region, &f) in fractions {
            if !self.regions.iter().any(|r| &r.name == region) {
                return Err(ChangeError::Invalid(format!(
                    "no region {region:?}; the regions are {}",
                    self.region_names()
                )));
            }
            if !(0.0..=1.0).contains(&f) {
                return Err(ChangeError::Invalid(format!(
                    "{region}: {f} is not in [0, 1]"
                )));
            }
            pin.insert(region.clone(), (f * 1e6).round() as u32);
        }
        let total: u64 = pin.values().map(|&p| u64::from(p)).sum();
        if total > u64::from(WHOLE) {
            return Err(ChangeError::Invalid(format!(
                "the fractions add up to {}, more than the whole limit",
                total as f64 / 1e6
            )));
        }
        if pin.is_empty() {
            return Err(ChangeError::Invalid(
                "give at least one REGION=FRACTION".into(),
            ));
        }
        self.change(id, |pins| {
            pins.insert(id.to_owned(), pin);
        })
    }

    /// Lets rule `id`'s shares follow demand again.
    ///
    /// # Errors
    ///
    /// An unknown rule.
    pub fn unpin(&self, id: &str) -> Result<Shares, ChangeError> {
        self.change(id, |pins| {
            pins.remove(id);
        })
    }

    /// Recomputes every unpinned rule's shares from the regions' demand now.
    ///
    /// # Errors
    ///
    /// The state file could not be written.
    pub fn rebalance(&self) -> Result<(), ChangeError> {
        self.reshare(&mut self.live(), |_| {})
    }

    fn change(
        &self,
        id: &str,
        edit: impl FnOnce(&mut BTreeMap<String, Shares>),
    ) -> Result<Shares, ChangeError> {
        let mut live = self.live();
        if live.rules.rule(id).is_none() {
            return Err(ChangeError::NoSuchRule(id.to_owned()));
        }
        self.reshare(&mut live, edit)?;
        Ok(live.durable.shares.get(id).cloned().unwrap_or_default())
    }

    /// Edits the pins, recomputes every rule's shares from them and the demand now, and
    /// commits the result with the rules in force.
    fn reshare(
        &self,
        live: &mut Live,
        edit: impl FnOnce(&mut BTreeMap<String, Shares>),
    ) -> Result<(), ChangeError> {
        let mut durable = live.durable.clone();
        edit(&mut durable.pins);
        durable.shares = shares_for(
            &live.rules,
            &self.regions,
            &durable.pins,
            &self.demand_now(),
        );
        let rules = RuleSet::clone(&live.rules);
        self.commit(live, durable, rules)
    }

    /// Folds one report's demand for rule `rule` in region `region` (cost per second, admitted
    /// and denied) into its smoothed demand.
    pub fn observe_demand(&self, region: &str, rule: &str, per_second: u64) {
        let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        demand
            .entry((rule.to_owned(), region.to_owned()))
            .or_insert_with(|| DemandSmoother::new(DEMAND_ALPHA_PPM))
            .observe(per_second);
    }

    /// Smoothed demand per (rule id, region).
    pub fn demand_now(&self) -> BTreeMap<(String, String), u64> {
        self.demand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, d)| (k.clone(), d.value()))
            .collect()
    }

    /// Recomputes unpinned shares from demand when one would move by more than
    /// [`REBALANCE_STEP_PPM`] and the rule's demand is at least a twentieth of its limit's
    /// rate; true when the shares changed.
    ///
    /// # Errors
    ///
    /// The state file could not be written; nothing changed.
    pub fn follow_demand(&self) -> Result<bool, ChangeError> {
        let mut live = self.live();
        let demand = self.demand_now();
        let mut next = shares_for(&live.rules, &self.regions, &live.durable.pins, &demand);
        // A rule whose traffic is a trickle keeps its shares: a handful of requests says
        // nothing about where demand is, and every move strands quota for a window.
        for rule in live.rules.rules() {
            let rate: u64 = self
                .regions
                .iter()
                .map(|r| {
                    demand
                        .get(&(rule.id().to_owned(), r.name.clone()))
                        .copied()
                        .unwrap_or(0)
                })
                .sum();
            let floor_rate = rule
                .limits()
                .iter()
                .map(|l| {
                    let secs = (l.limiter().window().as_u64() / 1_000_000_000).max(1);
                    l.limiter().limit() / secs / 20
                })
                .max()
                .unwrap_or(0);
            if rate < floor_rate.max(1)
                && let Some(current) = live.durable.shares.get(rule.id())
            {
                next.insert(rule.id().to_owned(), current.clone());
            }
        }
        let moved = next.iter().any(|(rule, shares)| {
            let before = live.durable.shares.get(rule);
            shares.iter().any(|(region, &ppm)| {
                let old = before.and_then(|b| b.get(region)).copied().unwrap_or(0);
                ppm.abs_diff(old) > REBALANCE_STEP_PPM
            }) || before.is_none()
        });
        if !moved {
            return Ok(false);
        }
        let mut durable = live.durable.clone();
        durable.shares = next;
        let rules = RuleSet::clone(&live.rules);
        self.commit(&mut live, durable, rules)?;
        Ok(true)
    }

    /// What region `region` may be holding of each limit: per limit, the largest share any of
    /// its regionals confirmed, with the latest window it applies from. `None` for a region no
    /// regional of which ever confirmed anything.
    pub fn held(&self, region: &str) -> Option<Held> {
        let live = self.live();
        let nodes = live.durable.held.get(region)?;
        let mut out = Held::new();
        for held in nodes.values() {
            for (&limit, &(ppm, from)) in held {
                let slot = out.entry(limit).or_insert((0, 0));
                *slot = (slot.0.max(ppm), slot.1.max(from));
            }
        }
        Some(out)
    }

    /// Records what regional `node` of `region` confirmed it holds, and writes it if it changed.
    ///
    /// # Errors
    ///
    /// The state file could not be written.
    pub fn record_held(&self, region: &str, node: &str, held: Held) -> Result<(), ChangeError> {
        let mut live = self.live();
        let current = live.durable.held.get(region).and_then(|n| n.get(node));
        if current == Some(&held) {
            return Ok(());
        }
        let mut durable = live.durable.clone();
        durable
            .held
            .entry(region.to_owned())
            .or_default()
            .insert(node.to_owned(), held);
        let rules = RuleSet::clone(&live.rules);
        self.commit(&mut live, durable, rules)
    }

    /// Writes `durable` and, once it is on disk, makes it the state in force.
    fn commit(&self, live: &mut Live, durable: Durable, rules: RuleSet) -> Result<(), ChangeError> {
        write_atomically(&self.path, &durable)?;
        *live = Live {
            durable,
            rules: Arc::new(rules),
        };
        Ok(())
    }

    fn region_names(&self) -> String {
        self.regions
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every rule's shares: its pin, or floors plus the rest by smoothed demand (equally while no
/// region has any).
fn shares_for(
    rules: &RuleSet,
    regions: &[RegionConfig],
    pins: &BTreeMap<String, Shares>,
    demand: &BTreeMap<(String, String), u64>,
) -> BTreeMap<String, Shares> {
    rules
        .rules()
        .iter()
        .map(|rule| {
            let pin = pins.get(rule.id());
            let input: Vec<RegionShare> = regions
                .iter()
                .map(|r| RegionShare {
                    demand: demand
                        .get(&(rule.id().to_owned(), r.name.clone()))
                        .copied()
                        .unwrap_or(0),
                    floor_ppm: r.floor_ppm,
                    pinned_ppm: pin.map(|p| p.get(&r.name).copied().unwrap_or(0)),
                })
                .collect();
            // Millionths of the whole; each limit is then split into whole units by these
            // weights when partitions are offered (`Coordinator::partition`).
            let shares = regions
                .iter()
                .zip(split(u64::from(WHOLE), &input))
                .map(|(r, ppm)| (r.name.clone(), u32::try_from(ppm).unwrap_or(WHOLE)))
                .collect();
            (rule.id().to_owned(), shares)
        })
        .collect()
}

/// Which rules `new` adds, removes or changes relative to `old`, by id.
fn diff(old: &RuleSet, new: &RuleSet) -> Diff {
    let ids = |set: &RuleSet| -> BTreeSet<String> {
        set.rules().iter().map(|r| r.id().to_owned()).collect()
    };
    let (before, after) = (ids(old), ids(new));
    let changed = before
        .intersection(&after)
        .filter(|id| old.rule(id) != new.rule(id))
        .cloned()
        .collect();
    Diff {
        added: after.difference(&before).cloned().collect(),
        removed: before.difference(&after).cloned().collect(),
        changed,
    }
}

/// The rule set's YAML without the rule at `index` (an endpoint in file order, `default`, or
/// `tiers.<name>`).
fn without_rule(
    yaml: &str,
    rules: &RuleSet,
    index: usize,
    id: &str,
) -> Result<String, ChangeError> {
    use serde_yaml_ng::Value;
    let refuse = |reason: &str| {
        ChangeError::Rules(ConfigError::Document {
            file: "rate-limits".into(),
            reason: format!("cannot remove {id:?}: {reason}"),
        })
    };
    let mut doc: Value =
        serde_yaml_ng::from_str(yaml).map_err(|_| refuse("the rule set no longer parses"))?;
    let limits = doc
        .get_mut("rate_limits")
        .ok_or_else(|| refuse("no rate_limits"))?;
    if id == "default" {
        limits
            .as_mapping_mut()
            .and_then(|m| m.remove("default"))
            .ok_or_else(|| refuse("no default"))?;
    } else if let Some(tier) = id.strip_prefix("tiers.")
        && rules.tiers().any(|t| t == tier)
    {
        limits
            .get_mut("tiers")
            .and_then(Value::as_mapping_mut)
            .and_then(|m| m.remove(tier))
            .ok_or_else(|| refuse("no such tier"))?;
    } else {
        let endpoints = limits
            .get_mut("endpoints")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| refuse("no endpoints"))?;
        if index >= endpoints.len() {
            return Err(refuse("not an endpoint"));
        }
        endpoints.remove(index);
    }
    serde_yaml_ng::to_string(&doc).map_err(|e| refuse(&e.to_string()))
}

/// Writes `durable` to `path` so that a crash leaves the old file or the new one: a temporary
/// file beside it, synced, renamed over it, and the directory synced.
fn write_atomically(path: &Path, durable: &Durable) -> Result<(), ChangeError> {
    let failed = |source| ChangeError::Write {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(durable).map_err(|e| failed(std::io::Error::other(e)))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        fs::create_dir_all(dir).map_err(failed)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::File::create(&tmp).map_err(failed)?;
    file.write_all(&json).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    fs::rename(&tmp, path).map_err(failed)?;
    if let Some(dir) = dir {
        // The rename is durable once the directory is; a failure here is reported like any
        // other, though the new file is already in place.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(failed)?;
    }
    Ok(())
}
