//! Per-connection rate limit of protocol section 4: a token bucket of `limits.burst` refilled at
//! `limits.messages_per_second`, and the abuse rule (a connection that collects 100
//! `rate_limited` answers within 10 seconds is closed with 1008 right after the 100th). Pure:
//! time is passed in, so tests need no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const ABUSE_COUNT: usize = 100;
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer `rate_limited` and do not process the frame.
    Limited,
    /// The 100th refusal within the window: answer `rate_limited`, then close with 1008.
    Abuse,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
    recent_refusals: VecDeque<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            rate: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            refilled_at: now,
            recent_refusals: VecDeque::new(),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        while self.recent_refusals.front().is_some_and(|t| now.saturating_duration_since(*t) > ABUSE_WINDOW) {
            self.recent_refusals.pop_front();
        }
        self.recent_refusals.push_back(now);
        if self.recent_refusals.len() >= ABUSE_COUNT {
            return Verdict::Abuse;
        }
        Verdict::Limited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10, 20, start);
        assert!((0..20).all(|_| limiter.check(start) == Verdict::Allow));
        assert_eq!(limiter.check(start), Verdict::Limited);
        // 100 ms later exactly one more token has come back.
        let later = start + Duration::from_millis(100);
        assert_eq!(limiter.check(later), Verdict::Allow);
        assert_eq!(limiter.check(later), Verdict::Limited);
    }

    #[test]
    fn hundred_refusals_in_ten_seconds_is_abuse() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, 1, start);
        assert_eq!(limiter.check(start), Verdict::Allow);
        for _ in 1..ABUSE_COUNT {
            assert_eq!(limiter.check(start), Verdict::Limited);
        }
        assert_eq!(limiter.check(start), Verdict::Abuse, "the 100th refusal closes");
    }

    #[test]
    fn old_refusals_expire() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, 1, start);
        limiter.check(start);
        for _ in 1..ABUSE_COUNT {
            assert_eq!(limiter.check(start), Verdict::Limited);
        }
        // Eleven seconds later the window is empty again (and a token has come back).
        let later = start + Duration::from_secs(11);
        assert_eq!(limiter.check(later), Verdict::Allow);
        assert_eq!(limiter.check(later), Verdict::Limited);
    }
}
