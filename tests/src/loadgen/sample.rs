//! The generator's randomness: a small seeded PRNG, weighted choice, and the Zipf distribution
//! over key ranks.
//!
//! Written here rather than taken from `rand`: the workspace does not depend on it directly,
//! and what we need is twenty lines. Every worker seeds its own [`Rng`] from `--seed` and its
//! index, so a run is reproducible in what it sends (not in what it is answered: that depends
//! on timing).

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64: fast, and statistically far
/// better than a load generator needs.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform `f64` in `[0, 1)`, from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A choice among `n` outcomes with fixed weights: the cumulative distribution, searched.
#[derive(Clone, Debug)]
pub struct Weighted {
    /// `cdf[i]` is the probability of an outcome `≤ i`; the last is 1.
    cdf: Vec<f64>,
}

/// A relative weight as written in the flag item `item` (`search=2`, `eu=3`): a finite
/// number ≥ 0, or why not.
pub fn parse_weight(item: &str, text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(weight) if weight.is_finite() && weight >= 0.0 => Ok(weight),
        Ok(_) => Err(format!("{item:?}: a weight is a number ≥ 0")),
        Err(_) => Err(format!("{item:?}: the weight {text:?} is not a number")),
    }
}

impl Weighted {
    /// Outcome `i` with probability `weights[i] / Σ weights`; `None` when there is no weight
    /// above zero, or one is negative or not finite.
    pub fn new(weights: &[f64]) -> Option<Weighted> {
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return None;
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 || !total.is_finite() {
            return None;
        }
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w;
                acc / total
            })
            .collect();
        // Rounding may leave the last a hair under 1; a draw must always land somewhere.
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Some(Weighted { cdf })
    }

    /// How many outcomes there are.
    pub fn len(&self) -> usize {
        self.cdf.len()
    }

    /// Never true: a `Weighted` has at least one outcome.
    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    /// The probability of outcome `i`.
    pub fn probability(&self, i: usize) -> f64 {
        let below = if i == 0 { 0.0 } else { self.cdf[i - 1] };
        self.cdf.get(i).map_or(0.0, |c| c - below)
    }

    /// One outcome: the first whose cumulative probability exceeds a uniform draw (binary
    /// search, `O(log n)`).
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// Zipf's law over ranks `0..n`: rank `k` (0-based) with probability proportional to
/// `1 / (k + 1)^s`. `s = 0` is uniform; `s ≈ 1` is the classic web-traffic skew, where the
/// hottest of 1,000 keys gets about 13% of the requests.
#[derive(Clone, Debug)]
pub struct Zipf {
    ranks: Weighted,
}

impl Zipf {
    /// Zipf over `n` ranks with exponent `s`; `None` when `n` is zero or `s` is negative or
    /// not finite.
    pub fn new(n: u32, s: f64) -> Option<Zipf> {
        if n == 0 || !s.is_finite() || s < 0.0 {
            return None;
        }
        let weights: Vec<f64> = (1..=n).map(|k| f64::from(k).powf(-s)).collect();
        Weighted::new(&weights).map(|ranks| Zipf { ranks })
    }

    /// One rank, `0` the hottest.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        // `len() ≤ n`, which came in as a `u32`.
        u32::try_from(self.ranks.sample(rng)).unwrap_or(u32::MAX)
    }

    /// The probability of rank `k`.
    pub fn probability(&self, k: u32) -> f64 {
        self.ranks.probability(k as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_draws_follow_the_weights() {
        let w = Weighted::new(&[3.0, 1.0, 0.0, 1.0]).unwrap();
        let mut rng = Rng::new(7);
        let mut seen = [0u32; 4];
        for _ in 0..100_000 {
            seen[w.sample(&mut rng)] += 1;
        }
        assert_eq!(seen[2], 0, "a zero weight is never drawn");
        let share = f64::from(seen[0]) / 100_000.0;
        assert!((share - 0.6).abs() < 0.01, "{seen:?}");
        assert!(Weighted::new(&[]).is_none());
        assert!(Weighted::new(&[0.0]).is_none());
        assert!(Weighted::new(&[1.0, -1.0]).is_none());
    }

    #[test]
    fn zipf_matches_its_probabilities() {
        let z = Zipf::new(1000, 1.0).unwrap();
        // H(1000) ≈ 7.4855: the hottest key gets 1/H of the draws.
        assert!((z.probability(0) - 1.0 / 7.4855).abs() < 1e-4);
        assert!((z.probability(1) - z.probability(0) / 2.0).abs() < 1e-12);
        let mut rng = Rng::new(1);
        let n = 200_000;
        let hot = (0..n).filter(|_| z.sample(&mut rng) == 0).count();
        let share = hot as f64 / f64::from(n);
        assert!((share - z.probability(0)).abs() < 0.005, "{share}");
        let uniform = Zipf::new(4, 0.0).unwrap();
        assert!((uniform.probability(3) - 0.25).abs() < 1e-12);
        assert!(Zipf::new(0, 1.0).is_none());
        assert!(Zipf::new(10, f64::NAN).is_none());
    }
}
