//! Batches from a [`PairSource`], deterministic and resumable mid-pass.
//!
//! Pass `p` lists the source's references for `(seed, p, rank)` and, for sources that
//! ask for one, passes them through a seeded shuffle buffer (webdataset's: fill to
//! `n`, then emit a random slot and refill it; at the end, drain in random order). A
//! batch takes the next references, decodes them in parallel, skips and counts the
//! corrupt ones, and takes more until it holds `b` good pairs — the first `b` good
//! pairs in stream order, whatever the thread count. A pass that ends inside a batch
//! drops it (`drop_last`) and the batch starts over in the next pass.
//!
//! The [`DataPosition`] after a batch (pass, references consumed in it, skip counts)
//! is all a checkpoint needs: [`PairStream::new`] at a position lists the pass again
//! and discards that many references without reading a pixel.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Loaded, PairSource, RefIter, SampleRef, Sharding, transform_seed};
use crate::image::Image;
use crate::{DataError, mix_seed};

/// How many skipped keys are kept for messages and reports.
pub const FIRST_SKIPPED: usize = 10;

/// Counts of what was read and skipped, and the first skipped keys with their reasons.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SkipStats {
    /// References read (good and skipped).
    pub seen: u64,
    pub skipped: u64,
    /// Skips per kind of reason (the reason up to its first colon or digit).
    pub by_reason: BTreeMap<String, u64>,
    /// The first [`FIRST_SKIPPED`] `(key, reason)`.
    pub first: Vec<(String, String)>,
}

impl SkipStats {
    pub(crate) fn record(&mut self, key: &str, reason: &str) {
        self.skipped += 1;
        *self.by_reason.entry(reason_kind(reason)).or_default() += 1;
        if self.first.len() < FIRST_SKIPPED {
            self.first.push((key.to_string(), reason.to_string()));
        }
    }

    /// The skipped share of what was read.
    pub fn share(&self) -> f64 {
        self.skipped as f64 / self.seen.max(1) as f64
    }
}

/// A short, countable form of a skip reason: the words that say what is wrong, before
/// any detail (a leading file or member name, numbers, parentheses).
fn reason_kind(reason: &str) -> String {
    let r = match reason.split_once(": ") {
        // "img.jpg: not a …", ".png: empty …", "a/b.png: …" → the part after the name.
        Some((a, b)) if !a.contains(' ') => b,
        _ => reason,
    };
    r.split([':', '('])
        .next()
        .unwrap_or(r)
        .split_whitespace()
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a stream stands: what a checkpoint stores to resume it exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based pass over the source.
    pub pass: u64,
    /// References of this pass already consumed (good, skipped, or dropped with a
    /// partial batch at the end of the previous pass: then `pass` has moved on).
    pub consumed: u64,
    pub stats: SkipStats,
}

/// When corrupt samples stop a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SkipPolicy {
    /// Largest skipped share tolerated.
    pub max_skipped: f64,
    /// The share is judged once this many references were read (and at every pass end).
    pub min_seen: u64,
}

impl From<&super::CorruptPolicy> for SkipPolicy {
    fn from(c: &super::CorruptPolicy) -> Self {
        Self {
            max_skipped: c.max_skipped,
            ..Self::default()
        }
    }
}

impl Default for SkipPolicy {
    fn default() -> Self {
        Self {
            max_skipped: 0.01,
            min_seen: 100,
        }
    }
}

/// One good pair, transformed to the model's size.
#[derive(Clone, Debug)]
pub struct Sample {
    pub key: String,
    pub image: Image,
    pub caption: String,
}

/// A seeded shuffle buffer over a pass's references.
struct Shuffled {
    inner: RefIter,
    buf: Vec<SampleRef>,
    cap: usize,
    rng: ChaCha8Rng,
    done: bool,
}

impl Iterator for Shuffled {
    type Item = Result<SampleRef, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.buf.len() < self.cap {
            match self.inner.next() {
                Some(Ok(r)) => self.buf.push(r),
                Some(Err(e)) => return Some(Err(e)),
                None => self.done = true,
            }
        }
        if self.buf.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buf.len());
        Some(Ok(self.buf.swap_remove(j)))
    }
}

/// Batches of good pairs from a source, in a reproducible order.
pub struct PairStream {
    source: Arc<dyn PairSource>,
    seed: u64,
    sharding: Sharding,
    policy: SkipPolicy,
    refs: RefIter,
    pos: DataPosition,
}

impl std::fmt::Debug for PairStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairStream")
            .field("source", &self.source.describe())
            .field("pos", &self.pos)
            .finish()
    }
}

impl PairStream {
    /// A stream at `at` (the default position: the start).
    pub fn new(
        source: Arc<dyn PairSource>,
        seed: u64,
        sharding: Sharding,
        policy: SkipPolicy,
        at: DataPosition,
    ) -> Result<Self, DataError> {
        let mut refs = Self::list(&*source, seed, sharding, at.pass)?;
        for i in 0..at.consumed {
            match refs.next() {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(DataError::Invalid(format!(
                        "cannot resume at reference {} of pass {}: the pass has only {i} ({}); did the data change?",
                        at.consumed,
                        at.pass,
                        source.describe()
                    )));
                }
            }
        }
        Ok(Self {
            source,
            seed,
            sharding,
            policy,
            refs,
            pos: at,
        })
    }

    fn list(
        source: &dyn PairSource,
        seed: u64,
        sharding: Sharding,
        pass: u64,
    ) -> Result<RefIter, DataError> {
        let inner = source.pass(seed, pass, sharding)?;
        let cap = source.shuffle_buffer();
        if cap <= 1 {
            return Ok(inner);
        }
        let rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, 0x5B0F, pass, sharding.rank as u64]));
        Ok(Box::new(Shuffled {
            inner,
            buf: Vec::new(),
            cap,
            rng,
            done: false,
        }))
    }

    pub fn position(&self) -> &DataPosition {
        &self.pos
    }

    fn next_pass(&mut self) -> Result<(), DataError> {
        self.check(true)?;
        self.pos.pass += 1;
        self.pos.consumed = 0;
        self.refs = Self::list(&*self.source, self.seed, self.sharding, self.pos.pass)?;
        Ok(())
    }

    fn check(&self, pass_end: bool) -> Result<(), DataError> {
        let s = &self.pos.stats;
        if (pass_end || s.seen >= self.policy.min_seen)
            && s.skipped > 0
            && s.share() > self.policy.max_skipped
        {
            let first: Vec<String> = s.first.iter().map(|(k, r)| format!("{k}: {r}")).collect();
            return Err(DataError::Invalid(format!(
                "{} of {} samples read were corrupt and skipped ({:.2}%), above data.corrupt.max_skipped = {}%; by reason {:?}; the first: {}",
                s.skipped,
                s.seen,
                100.0 * s.share(),
                100.0 * self.policy.max_skipped,
                s.by_reason,
                first.join("; ")
            )));
        }
        Ok(())
    }

    /// The next `b` good samples, each with the image made `size × size` by the
    /// source's transform (or checked to be so), and the position after them.
    pub fn next_batch(
        &mut self,
        b: usize,
        size: usize,
    ) -> Result<(Vec<Sample>, DataPosition), DataError> {
        let mut good: Vec<Sample> = Vec::with_capacity(b);
        let mut empty_passes = 0;
        while good.len() < b {
            let want = b - good.len();
            let mut chunk = Vec::with_capacity(want);
            while chunk.len() < want {
                match self.refs.next() {
                    Some(r) => {
                        chunk.push((self.pos.consumed, r?));
                        self.pos.consumed += 1;
                    }
                    None => break,
                }
            }
            let ended = chunk.len() < want;
            let (source, seed, pass, rank) =
                (&self.source, self.seed, self.pos.pass, self.sharding.rank);
            let loaded = decode_all(source.as_ref(), &chunk, |ordinal, p| {
                let image = to_model_size(
                    source.as_ref(),
                    &p,
                    size,
                    transform_seed(seed, pass, rank, ordinal),
                )?;
                Ok(Sample {
                    key: p.key,
                    image,
                    caption: p.caption,
                })
            })?;
            for item in loaded {
                self.pos.stats.seen += 1;
                match item {
                    Ok(s) => good.push(s),
                    Err((key, reason)) => self.pos.stats.record(&key, &reason),
                }
            }
            if ended {
                // The pass ended inside this batch (a short chunk leaves it short of
                // `b`): drop it, as drop_last does, and start over in the next pass.
                empty_passes += 1;
                if empty_passes > 1 {
                    return Err(DataError::Invalid(format!(
                        "a whole pass over {} gave fewer than one batch of {b} good samples",
                        self.source.describe()
                    )));
                }
                good.clear();
                self.next_pass()?;
            }
        }
        self.check(false)?;
        Ok((good, self.pos.clone()))
    }
}

/// A decoded reference: the value, or the key and reason of a skip.
pub type Decoded<T> = Result<T, (String, String)>;

/// Load `refs` (with their ordinals in the pass) in parallel on the current rayon pool
/// and turn each good pair into a `T` with `make`: per reference, in order, the `T` or
/// the key and reason of a skip. An empty (0×0) image is a skip. `Err` only for what
/// skipping cannot mend.
pub fn decode_all<T: Send>(
    source: &dyn PairSource,
    refs: &[(u64, SampleRef)],
    make: impl Fn(u64, super::Pair) -> Result<T, String> + Sync,
) -> Result<Vec<Decoded<T>>, DataError> {
    refs.par_iter()
        .map(|(ordinal, r)| {
            Ok(match source.load(r)? {
                Loaded::Skip { key, reason } => Err((key, reason)),
                Loaded::Pair(p) if p.image.width == 0 || p.image.height == 0 => {
                    let reason =
                        format!("the image is empty ({}×{})", p.image.width, p.image.height);
                    Err((p.key, reason))
                }
                Loaded::Pair(p) => {
                    let key = p.key.clone();
                    make(*ordinal, p).map_err(|reason| (key, reason))
                }
            })
        })
        .collect()
}

/// Read `source` in file order, `chunk` references at a time, decoding each with
/// `make`, until `keep` says stop; returns what was kept and the skip counts.
pub fn read_in_order<T: Send>(
    source: &dyn PairSource,
    limit: usize,
    make: impl Fn(u64, super::Pair) -> Result<T, String> + Sync,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<T>, SkipStats), DataError> {
    let mut stats = SkipStats::default();
    let mut out = Vec::new();
    let mut refs = source.in_order()?.enumerate();
    while out.len() < limit {
        let chunk: Vec<(u64, SampleRef)> = refs
            .by_ref()
            .take(256.min(limit - out.len()))
            .map(|(i, r)| r.map(|r| (i as u64, r)))
            .collect::<Result<_, _>>()?;
        if chunk.is_empty() {
            break;
        }
        for item in decode_all(source, &chunk, &make)? {
            stats.seen += 1;
            match item {
                Ok(t) => out.push(t),
                Err((key, reason)) => stats.record(&key, &reason),
            }
        }
        progress(stats.seen);
    }
    Ok((out, stats))
}

/// The source's transform, or the image as it is when it already has the size.
fn to_model_size(
    source: &dyn PairSource,
    p: &super::Pair,
    size: usize,
    seed: u64,
) -> Result<Image, String> {
    match source.transform() {
        Some(t) => t.apply(&p.image, seed).map_err(|e| e.to_string()),
        None if p.image.width == size && p.image.height == size => Ok(p.image.to_rgb()),
        None => Err(format!(
            "the image is {}×{}, the model takes {size}×{size} and the source has no transform",
            p.image.width, p.image.height
        )),
    }
}

/// The first `n` good pairs of `source` in file order, with CLIP's evaluation transform
/// (resize, centre crop) at `size`, and what was skipped on the way: the held-out pairs
/// of a final evaluation.
pub fn eval_pairs(
    source: &dyn PairSource,
    n: usize,
    size: usize,
) -> Result<(Vec<Sample>, SkipStats), DataError> {
    read_in_order(
        source,
        n,
        |_, p| {
            Ok(Sample {
                key: p.key,
                image: p.image.clip_eval(size),
                caption: p.caption,
            })
        },
        &|_| {},
    )
}
