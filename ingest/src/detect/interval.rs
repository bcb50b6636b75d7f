//! One rule's abnormal interval on one line, as a state machine in event
//! time (the line's sample clock, never arrival time).
//!
//! ```text
//! Idle --holds--> Pending --held >= min_duration--> Open --clear--> Clearing
//!  ^                 |                               ^                 |
//!  +-----clear-------+                               +-----holds-------+
//!  ^                                                                   |
//!  +------------------ clear for >= clear_duration: Closed ------------+
//! ```
//!
//! Invariants:
//! - An interval starts when its condition started (which may be earlier
//!   than the sample that confirmed it) and ends when the condition stopped
//!   holding, not when the clear duration confirmed it.
//! - Intervals of one rule on one line never overlap: a new one starts no
//!   earlier than the previous one ended.
//! - The facilities of an interval are the union over its whole span.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What the line's current states say about the rule's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// It holds, and has since `since_ms`; `involved` are the facilities
    /// that make it hold.
    Holds {
        since_ms: i64,
        involved: BTreeSet<String>,
    },
    /// It does not hold, and has not since `since_ms`.
    Clear { since_ms: i64 },
    /// A gap in the data: it may or may not hold, since `since_ms`. An
    /// interval neither opens nor clears on a gap; one that stays unknown
    /// for the clear duration ends when it was last known to hold.
    Unknown { since_ms: i64 },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Durations {
    pub(crate) min_ms: i64,
    pub(crate) clear_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    /// No interval; the next may not start before `floor_ms`.
    Idle { floor_ms: i64 },
    /// The condition holds but not yet for the minimum duration.
    Pending {
        start_ms: i64,
        facilities: BTreeSet<String>,
    },
    Open {
        start_ms: i64,
        facilities: BTreeSet<String>,
    },
    /// The condition stopped at `end_ms`; closes after the clear duration.
    Clearing {
        start_ms: i64,
        end_ms: i64,
        facilities: BTreeSet<String>,
    },
}

impl Default for Phase {
    fn default() -> Self {
        Phase::Idle { floor_ms: i64::MIN }
    }
}

/// A change the platform must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Opened {
        start_ms: i64,
        facilities: BTreeSet<String>,
    },
    /// Still open, with more facilities involved than last reported.
    Widened {
        start_ms: i64,
        facilities: BTreeSet<String>,
    },
    Closed {
        start_ms: i64,
        end_ms: i64,
        facilities: BTreeSet<String>,
    },
}

impl Phase {
    /// Advances to `now_ms` given the condition; returns what changed, in
    /// order (an interval found late can open and close in one step).
    /// `settled_ms` (at most `now_ms`): the line's facility states are
    /// settled up to then; after it a facility has a change pending its
    /// debounce, which may turn out to have ended the condition at that
    /// moment. An interval opens only once it has held for the minimum up to
    /// `settled_ms`, so a condition that ends one reading short of the
    /// minimum never opens (and then closes shorter than its minimum).
    pub(crate) fn advance(
        &mut self,
        now_ms: i64,
        settled_ms: i64,
        condition: Condition,
        d: Durations,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let phase = std::mem::take(self);
        *self = match (phase, condition) {
            (Phase::Idle { floor_ms }, Condition::Holds { since_ms, involved }) => {
                let start_ms = since_ms.max(floor_ms).min(now_ms);
                Phase::Pending {
                    start_ms,
                    facilities: involved,
                }
                .confirm(settled_ms.min(now_ms), d, &mut changes)
            }
            (idle @ Phase::Idle { .. }, Condition::Clear { .. } | Condition::Unknown { .. }) => {
                idle
            }
            (pending @ Phase::Pending { .. }, Condition::Unknown { since_ms }) => {
                if now_ms - since_ms >= d.clear_ms {
                    // Never confirmed before the data went missing.
                    Phase::Idle { floor_ms: since_ms }
                } else {
                    pending
                }
            }
            (
                Phase::Open {
                    start_ms,
                    facilities,
                },
                Condition::Unknown { since_ms },
            ) => {
                if now_ms - since_ms >= d.clear_ms {
                    let end_ms = since_ms.clamp(start_ms, now_ms);
                    changes.push(Change::Closed {
                        start_ms,
                        end_ms,
                        facilities,
                    });
                    Phase::Idle { floor_ms: end_ms }
                } else {
                    Phase::Open {
                        start_ms,
                        facilities,
                    }
                }
            }
            (clearing @ Phase::Clearing { .. }, Condition::Unknown { .. }) => {
                clearing.settle(now_ms, d, &mut changes)
            }
            (
                Phase::Pending {
                    start_ms,
                    mut facilities,
                },
                Condition::Holds { involved, .. },
            ) => {
                facilities.extend(involved);
                Phase::Pending {
                    start_ms,
                    facilities,
                }
                .confirm(settled_ms.min(now_ms), d, &mut changes)
            }
            (
                Phase::Pending {
                    start_ms,
                    facilities,
                },
                Condition::Clear { since_ms },
            ) => {
                let end_ms = since_ms.clamp(start_ms, now_ms);
                if end_ms - start_ms >= d.min_ms {
                    // It held long enough between two samples far apart.
                    changes.push(Change::Opened {
                        start_ms,
                        facilities: facilities.clone(),
                    });
                    Phase::Clearing {
                        start_ms,
                        end_ms,
                        facilities,
                    }
                    .settle(now_ms, d, &mut changes)
                } else {
                    Phase::Idle { floor_ms: end_ms }
                }
            }
            (
                Phase::Open {
                    start_ms,
                    facilities,
                },
                Condition::Holds { involved, .. },
            )
            | (
                Phase::Clearing {
                    start_ms,
                    facilities,
                    ..
                },
                Condition::Holds { involved, .. },
            ) => {
                let widened = !involved.is_subset(&facilities);
                let mut facilities = facilities;
                facilities.extend(involved);
                if widened {
                    changes.push(Change::Widened {
                        start_ms,
                        facilities: facilities.clone(),
                    });
                }
                Phase::Open {
                    start_ms,
                    facilities,
                }
            }
            (
                Phase::Open {
                    start_ms,
                    facilities,
                },
                Condition::Clear { since_ms },
            ) => Phase::Clearing {
                start_ms,
                end_ms: since_ms.clamp(start_ms, now_ms),
                facilities,
            }
            .settle(now_ms, d, &mut changes),
            (clearing @ Phase::Clearing { .. }, Condition::Clear { .. }) => {
                clearing.settle(now_ms, d, &mut changes)
            }
        };
        changes
    }

    /// Pending -> Open once the condition has held for the minimum duration.
    fn confirm(self, settled_ms: i64, d: Durations, changes: &mut Vec<Change>) -> Phase {
        match self {
            Phase::Pending {
                start_ms,
                facilities,
            } if settled_ms - start_ms >= d.min_ms => {
                changes.push(Change::Opened {
                    start_ms,
                    facilities: facilities.clone(),
                });
                Phase::Open {
                    start_ms,
                    facilities,
                }
            }
            other => other,
        }
    }

    /// Clearing -> Idle (closed) once clear for the clear duration.
    fn settle(self, now_ms: i64, d: Durations, changes: &mut Vec<Change>) -> Phase {
        match self {
            Phase::Clearing {
                start_ms,
                end_ms,
                facilities,
            } if now_ms - end_ms >= d.clear_ms => {
                changes.push(Change::Closed {
                    start_ms,
                    end_ms,
                    facilities,
                });
                Phase::Idle { floor_ms: end_ms }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Durations = Durations {
        min_ms: 600,
        clear_ms: 120,
    };

    fn holds(since_ms: i64, involved: &[&str]) -> Condition {
        Condition::Holds {
            since_ms,
            involved: involved.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Feeds `(now, condition)` steps and collects every change.
    fn run(steps: Vec<(i64, Condition)>) -> Vec<Change> {
        let mut phase = Phase::default();
        steps
            .into_iter()
            .flat_map(|(now, c)| phase.advance(now, now, c, D))
            .collect()
    }

    #[test]
    fn condition_held_exactly_the_minimum_opens_from_its_start() {
        let changes = run(vec![(100, holds(90, &["fan"])), (690, holds(90, &["fan"]))]);
        assert_eq!(
            changes,
            vec![Change::Opened {
                start_ms: 90,
                facilities: set(&["fan"])
            }]
        );
    }

    #[test]
    fn condition_one_step_short_of_the_minimum_gives_nothing() {
        let changes = run(vec![
            (100, holds(90, &["fan"])),
            (689, holds(90, &["fan"])),
            (700, Condition::Clear { since_ms: 689 }),
            (2000, Condition::Clear { since_ms: 689 }),
        ]);
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn interval_closes_after_the_clear_duration_with_the_end_when_it_cleared() {
        let changes = run(vec![
            (0, holds(0, &["fan"])),
            (600, holds(0, &["fan"])),
            (700, holds(0, &["esp"])),
            (800, Condition::Clear { since_ms: 790 }),
            (909, Condition::Clear { since_ms: 790 }),
            (910, Condition::Clear { since_ms: 790 }),
        ]);
        assert_eq!(
            changes,
            vec![
                Change::Opened {
                    start_ms: 0,
                    facilities: set(&["fan"])
                },
                Change::Widened {
                    start_ms: 0,
                    facilities: set(&["esp", "fan"])
                },
                Change::Closed {
                    start_ms: 0,
                    end_ms: 790,
                    facilities: set(&["esp", "fan"])
                },
            ]
        );
    }

    #[test]
    fn relapse_within_the_clear_duration_continues_the_same_interval() {
        let changes = run(vec![
            (0, holds(0, &["fan"])),
            (600, holds(0, &["fan"])),
            (650, Condition::Clear { since_ms: 650 }),
            (700, holds(700, &["fan"])),
            (1000, Condition::Clear { since_ms: 1000 }),
            (1120, Condition::Clear { since_ms: 1000 }),
        ]);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(
            changes[1],
            Change::Closed {
                start_ms: 0,
                end_ms: 1000,
                facilities: set(&["fan"])
            }
        );
    }

    #[test]
    fn a_long_unobserved_hold_opens_and_closes_in_one_step() {
        let changes = run(vec![
            (0, holds(0, &["fan"])),
            (5000, Condition::Clear { since_ms: 4000 }),
        ]);
        assert_eq!(
            changes,
            vec![
                Change::Opened {
                    start_ms: 0,
                    facilities: set(&["fan"])
                },
                Change::Closed {
                    start_ms: 0,
                    end_ms: 4000,
                    facilities: set(&["fan"])
                },
            ]
        );
    }

    #[test]
    fn next_interval_never_starts_before_the_previous_ended() {
        let changes = run(vec![
            (0, holds(0, &["fan"])),
            (600, holds(0, &["fan"])),
            (700, Condition::Clear { since_ms: 700 }),
            (900, Condition::Clear { since_ms: 700 }),
            // Backdated start from debounce reaches before the last end.
            (1000, holds(650, &["fan"])),
            (1400, holds(650, &["fan"])),
        ]);
        assert_eq!(
            changes.last(),
            Some(&Change::Opened {
                start_ms: 700,
                facilities: set(&["fan"])
            })
        );
    }
}
