//! How many concurrent commands ("lanes") a worker's bulk writes are cut into
//! (`apply.write_lanes`): a fixed count, or `auto`, where the worker measures the statements
//! per second of its own bulk writes and keeps the lane count that writes fastest. A server
//! that runs writes in parallel (document-level concurrency on cores to spare) gets more
//! lanes; one that runs them one at a time, or is saturated, keeps one, as more commands
//! there only add round trips and connections.

use std::time::Duration;

/// Fewer statements than this per lane cost more in round trips than they gain.
pub const MIN_STATEMENTS_PER_LANE: usize = 250;

/// How many concurrent commands `statements` statements of one kind are cut into, with up to
/// `write_lanes` allowed: the statements of a round address distinct documents, so the server
/// may run them in any order and in parallel; each lane gets at least
/// [`MIN_STATEMENTS_PER_LANE`].
pub fn lane_count(statements: usize, write_lanes: usize) -> usize {
    statements
        .div_ceil(MIN_STATEMENTS_PER_LANE)
        .clamp(1, write_lanes.max(1))
}

/// Eligible writes (ones [`lane_count`] could cut) before the first trial.
const FIRST_TRIAL_AFTER: u32 = 4;
/// Eligible writes between a trial that changed nothing and the next one, at first; doubled
/// after every such trial up to [`MAX_SETTLE_WRITES`], so a settled worker spends almost all
/// its writes at its best count.
const MIN_SETTLE_WRITES: u32 = 32;
const MAX_SETTLE_WRITES: u32 = 512;
/// Writes of one trial, alternating between the current count and the candidate, so a
/// machine or server that slows down during the trial slows both arms alike.
const TRIAL_WRITES: u32 = 12;
/// More lanes are kept only when they write at least this much faster: each one costs a
/// connection and a command per batch.
const GAIN_TO_ADD_LANES: f64 = 1.10;
/// Fewer lanes are kept when they write at least this fast: the same speed for fewer
/// connections.
const PACE_TO_DROP_LANES: f64 = 0.97;

/// Statements written and the time their writes took, for one arm of a trial.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    writes: u32,
    statements: u64,
    time: Duration,
}

impl Tally {
    fn add(&mut self, statements: usize, took: Duration) {
        self.writes += 1;
        self.statements += statements as u64;
        self.time += took;
    }

    fn rate(&self) -> f64 {
        self.statements as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug)]
enum Phase {
    /// Writing with the current count; a trial starts after `writes_left` more eligible writes.
    Settled { writes_left: u32 },
    /// Writes alternate between the current count and `candidate`.
    Trial {
        candidate: usize,
        /// Writes begun in this trial (even: current count, odd: candidate).
        begun: u32,
        at_current: Tally,
        at_candidate: Tally,
    },
}

/// The lane count one eligible write uses, and which arm of which trial it measures.
#[derive(Debug, Clone, Copy)]
pub struct LaneChoice {
    pub lanes: usize,
    /// `(trial, candidate arm)` while a trial runs.
    arm: Option<(u64, bool)>,
}

/// What a finished trial decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrialOutcome {
    pub from: usize,
    pub tried: usize,
    /// The candidate's statements per second over the current count's.
    pub ratio: f64,
    /// The count writes use from now on.
    pub now: usize,
}

/// `apply.write_lanes = "auto"`: one worker's lane count, between 1 and `max`, kept by trials
/// that alternate writes between the current count and its double (or half) and keep the
/// faster. Starts at one lane.
#[derive(Debug)]
pub struct LaneTuner {
    max: usize,
    current: usize,
    /// Settle length after the next trial that changes nothing.
    settle: u32,
    /// Whether the next trial tries more lanes (else fewer).
    next_up: bool,
    trial: u64,
    phase: Phase,
}

impl LaneTuner {
    pub fn new(max: usize) -> LaneTuner {
        LaneTuner {
            max: max.max(1),
            current: 1,
            settle: MIN_SETTLE_WRITES,
            next_up: true,
            trial: 0,
            phase: Phase::Settled {
                writes_left: FIRST_TRIAL_AFTER,
            },
        }
    }

    /// The most lanes this tuner may choose.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The count writes use outside trials.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The lane count for the next eligible write; pass it back to [`LaneTuner::record`].
    pub fn begin(&mut self) -> LaneChoice {
        if let Phase::Settled { writes_left } = &mut self.phase {
            if *writes_left > 0 {
                *writes_left -= 1;
                return LaneChoice {
                    lanes: self.current,
                    arm: None,
                };
            }
            match self.candidate() {
                Some(candidate) => {
                    self.trial += 1;
                    self.phase = Phase::Trial {
                        candidate,
                        begun: 0,
                        at_current: Tally::default(),
                        at_candidate: Tally::default(),
                    };
                }
                None => {
                    // One lane allowed: nothing to try.
                    self.phase = Phase::Settled {
                        writes_left: u32::MAX,
                    };
                    return LaneChoice {
                        lanes: self.current,
                        arm: None,
                    };
                }
            }
        }
        let Phase::Trial {
            candidate, begun, ..
        } = &mut self.phase
        else {
            unreachable!("a trial was started above");
        };
        let on_candidate = *begun % 2 == 1;
        *begun += 1;
        LaneChoice {
            lanes: if on_candidate {
                *candidate
            } else {
                self.current
            },
            arm: Some((self.trial, on_candidate)),
        }
    }

    /// Records a finished write of `statements` statements begun with `choice`; returns the
    /// trial's outcome when this write completed one.
    pub fn record(
        &mut self,
        choice: LaneChoice,
        statements: usize,
        took: Duration,
    ) -> Option<TrialOutcome> {
        let (trial, on_candidate) = choice.arm?;
        let Phase::Trial {
            candidate,
            at_current,
            at_candidate,
            ..
        } = &mut self.phase
        else {
            return None;
        };
        if trial != self.trial {
            return None;
        }
        if on_candidate {
            at_candidate.add(statements, took);
        } else {
            at_current.add(statements, took);
        }
        let per_arm = TRIAL_WRITES / 2;
        if at_current.writes < per_arm || at_candidate.writes < per_arm {
            return None;
        }
        let (from, tried) = (self.current, *candidate);
        let ratio = at_candidate.rate() / at_current.rate();
        let adopted = if tried > from {
            ratio >= GAIN_TO_ADD_LANES
        } else {
            ratio >= PACE_TO_DROP_LANES
        };
        let writes_left = if adopted {
            // Keep going the same way soon: the best count may be further.
            self.current = tried;
            self.next_up = tried > from;
            FIRST_TRIAL_AFTER
        } else {
            let settle = self.settle;
            self.settle = (self.settle * 2).min(MAX_SETTLE_WRITES);
            self.next_up = tried < from;
            settle
        };
        self.phase = Phase::Settled { writes_left };
        Some(TrialOutcome {
            from,
            tried,
            ratio,
            now: self.current,
        })
    }

    /// The count the next trial tries: double or half the current one, the other way when the
    /// preferred one is out of range.
    fn candidate(&mut self) -> Option<usize> {
        let up = (self.current * 2).min(self.max);
        let down = (self.current / 2).max(1);
        let (first, second) = if self.next_up { (up, down) } else { (down, up) };
        [first, second]
            .into_iter()
            .find(|&c| c != self.current)
            .inspect(|&c| self.next_up = c > self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_count_gives_each_lane_at_least_its_minimum_and_never_exceeds_write_lanes() {
        // A batch of 1,000 statements: four lanes of 250 by default, one with write_lanes = 1.
        assert_eq!(lane_count(1_000, 4), 4);
        assert_eq!(lane_count(1_000, 1), 1);
        assert_eq!(lane_count(1_000, 2), 2);
        assert_eq!(lane_count(1_000, 16), 4, "at least 250 statements per lane");
        assert_eq!(lane_count(5_000, 16), 16);
        // Small rounds stay one command; 0 lanes (never configured: the key's minimum is 1)
        // still sends the statements.
        assert_eq!(lane_count(249, 4), 1);
        assert_eq!(lane_count(251, 4), 2);
        assert_eq!(lane_count(0, 4), 1);
        assert_eq!(lane_count(1_000, 0), 1);
    }

    /// Runs `writes` writes of 1,000 statements one after another through a tuner, each taking
    /// `cost(lanes, write index)`; returns the lanes each write used.
    fn drive(
        tuner: &mut LaneTuner,
        writes: usize,
        cost: impl Fn(usize, usize) -> Duration,
    ) -> Vec<usize> {
        (0..writes)
            .map(|i| {
                let choice = tuner.begin();
                tuner.record(choice, 1_000, cost(choice.lanes, i));
                choice.lanes
            })
            .collect()
    }

    /// Per-write noise of ±`spread` (a deterministic sequence, so the test is repeatable).
    fn jitter(i: usize, spread: f64) -> f64 {
        let x = ((i as u64).wrapping_mul(2_654_435_761) % 1_000) as f64 / 1_000.0;
        1.0 + spread * (2.0 * x - 1.0)
    }

    #[test]
    fn a_destination_that_runs_commands_one_at_a_time_keeps_one_lane() {
        // Like the simulator: each extra concurrent command costs ~5 % and gains nothing.
        let mut tuner = LaneTuner::new(8);
        let lanes = drive(&mut tuner, 2_000, |lanes, i| {
            Duration::from_secs_f64(0.020 * (1.0 + 0.05 * (lanes - 1) as f64) * jitter(i, 0.2))
        });
        assert_eq!(tuner.current(), 1);
        let off_one = lanes.iter().filter(|&&l| l != 1).count();
        assert!(
            off_one <= 60,
            "trials are rare once settled: {off_one} of 2,000 writes were not on one lane"
        );
    }

    #[test]
    fn a_destination_that_runs_commands_in_parallel_gets_every_lane_it_can_use() {
        // Like a server with four cores to spare: a write takes a quarter of the time with
        // four lanes; beyond four the server is saturated.
        let mut tuner = LaneTuner::new(8);
        let lanes = drive(&mut tuner, 200, |lanes, i| {
            Duration::from_secs_f64(0.040 / lanes.min(4) as f64 * jitter(i, 0.2))
        });
        assert_eq!(tuner.current(), 4, "lanes used: {lanes:?}");
        let first_at_four = lanes.iter().position(|&l| l == 4).unwrap();
        assert!(
            first_at_four < 60,
            "reached 4 lanes at write {first_at_four}"
        );
    }

    #[test]
    fn lanes_that_stop_paying_are_given_back() {
        // Parallel at first (climbs to 8), then the server saturates: 8 lanes are no faster
        // than 1, and the tuner steps back down to fewer connections.
        let mut tuner = LaneTuner::new(8);
        drive(&mut tuner, 200, |lanes, _| {
            Duration::from_secs_f64(0.040 / lanes as f64)
        });
        assert_eq!(tuner.current(), 8);
        drive(&mut tuner, 3_000, |_, i| {
            Duration::from_secs_f64(0.010 * jitter(i, 0.02))
        });
        assert_eq!(tuner.current(), 1);
    }

    #[test]
    fn one_allowed_lane_never_tries_another() {
        let mut tuner = LaneTuner::new(1);
        let lanes = drive(&mut tuner, 500, |_, _| Duration::from_millis(10));
        assert!(lanes.iter().all(|&l| l == 1));
    }

    #[test]
    fn a_write_begun_in_an_earlier_trial_does_not_count_in_the_next() {
        let mut tuner = LaneTuner::new(2);
        // Settle, then begin a trial write and keep it outstanding.
        drive(&mut tuner, FIRST_TRIAL_AFTER as usize, |_, _| {
            Duration::from_millis(10)
        });
        let stale = tuner.begin();
        assert!(stale.arm.is_some(), "the first trial has begun");
        // Finish that trial with other writes, in favour of 2 lanes.
        for _ in 0..TRIAL_WRITES + 2 {
            let c = tuner.begin();
            let took = Duration::from_millis(if c.lanes == 2 { 5 } else { 10 });
            if tuner.record(c, 1_000, took).is_some() {
                break;
            }
        }
        assert_eq!(tuner.current(), 2);
        // The outstanding write of the finished trial is ignored.
        assert_eq!(tuner.record(stale, 1_000, Duration::from_secs(10)), None);
        assert_eq!(tuner.current(), 2);
    }
}
