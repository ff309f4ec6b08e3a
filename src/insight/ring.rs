//! Last-hour rings: a count per minute for the last [`MINUTES`] minutes,
//! lock-free (minute number and count packed in one atomic per slot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Minutes in the per-minute ring: the last hour.
pub const MINUTES: usize = 60;

/// Adds one to the current minute of a last-hour ring.
pub fn count_minute(ring: &[AtomicU64; MINUTES], now: Duration) {
    add_to_minute(ring, now, 1);
}

/// Adds `amount` to `now`'s minute of a last-hour ring.
pub fn add_to_minute(ring: &[AtomicU64; MINUTES], now: Duration, amount: u64) {
    let minute = now.as_secs() / 60 + 1;
    let slot = &ring[(minute % MINUTES as u64) as usize];
    let mut current = slot.load(Ordering::Relaxed);
    loop {
        // The count saturates at its 32 bits rather than spill into the
        // minute.
        let next = if current >> 32 == minute {
            current + amount.min(0xffff_ffff - (current & 0xffff_ffff))
        } else {
            (minute << 32) | amount.min(0xffff_ffff)
        };
        match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

/// A last-hour ring's counts, oldest minute first.
pub fn last_hour(ring: &[AtomicU64; MINUTES], now: Duration) -> [u64; MINUTES] {
    let this_minute = now.as_secs() / 60 + 1;
    let mut series = [0; MINUTES];
    for (age, value) in series.iter_mut().rev().enumerate() {
        let Some(minute) = this_minute.checked_sub(age as u64) else {
            break;
        };
        let packed = ring[(minute % MINUTES as u64) as usize].load(Ordering::Relaxed);
        if packed >> 32 == minute {
            *value = packed & 0xffff_ffff;
        }
    }
    series
}
