//! How busy the whole machine was, from `/proc/stat` (Linux): for the
//! benchmarks, which report the CPU time spent per unit of work next to
//! their rates. Every process counts (nats-server, a local PostgreSQL, the
//! benchmark itself), so a figure compares only with one taken the same way
//! on the same machine.

/// The machine's CPU counters at one moment, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuTicks {
    busy: u64,
    total: u64,
}

/// What the machine spent between two [`CpuTicks`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// Busy share of all CPUs, 0.0 to 1.0.
    pub busy_share: f64,
    /// CPU time spent, all CPUs together, in seconds.
    pub cpu_seconds: f64,
}

impl CpuTicks {
    /// The counters now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// What the machine spent from `before` to `self`.
    pub fn since(self, before: Self) -> Spent {
        let busy = self.busy.saturating_sub(before.busy) as f64;
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        Spent {
            busy_share: busy / total,
            // Linux reports USER_HZ ticks: 100 a second on every architecture.
            cpu_seconds: busy / 100.0,
        }
    }
}

fn parse(stat: &str) -> Option<CpuTicks> {
    let fields: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Some(CpuTicks {
        busy,
        total: busy + field(3) + field(4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_everything_but_idle_and_iowait() {
        let before = parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n");
        let after = parse("cpu  250 10 90 1500 100 5 5 0 0 0\ncpu0 1 1 1 1 1 1 1 1 1 1\n");
        let (Some(before), Some(after)) = (before, after) else {
            panic!("both lines parse");
        };
        // busy 150 -> 360 (+210), idle + iowait 850 -> 1600 (+750)
        let spent = after.since(before);
        assert!((spent.cpu_seconds - 2.1).abs() < 1e-9, "{spent:?}");
        assert!((spent.busy_share - 210.0 / 960.0).abs() < 1e-9, "{spent:?}");
        assert_eq!(parse("intr 1 2 3\n").map(|_| ()), None);
    }
}
