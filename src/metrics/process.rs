//! Process CPU, memory, threads and file descriptors from /proc, under the names every
//! Prometheus client library uses (`process_*`), so stock dashboards and alerts work unchanged.
//! Read at scrape time: a handful of small files, no background task.

use std::sync::OnceLock;

/// Linux reports /proc times in USER_HZ, which the kernel ABI fixes at 100 on every architecture
/// it exposes to user space through /proc.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub threads: f64,
    pub open_fds: f64,
    pub max_fds: f64,
    pub start_time_seconds: f64,
}

/// Reads this process's figures; a file that cannot be read leaves its figures at 0 (the metrics
/// endpoint must answer even on a system without /proc).
pub fn read() -> ProcessStats {
    let mut s = ProcessStats::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((cpu, start_ticks)) = parse_stat(&stat)
    {
        s.cpu_seconds = cpu;
        s.start_time_seconds = boot_time() + start_ticks / TICKS_PER_SECOND;
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let (rss, vsz, threads) = parse_status(&status);
        (s.resident_bytes, s.virtual_bytes, s.threads) = (rss, vsz, threads);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        s.open_fds = dir.count() as f64;
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        s.max_fds = parse_max_fds(&limits).unwrap_or(0.0);
    }
    s
}

/// `(utime + stime in seconds, starttime in ticks)` from /proc/self/stat. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after its last ')'.
fn parse_stat(stat: &str) -> Option<(f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let ticks = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    Some(((ticks(14)? + ticks(15)?) / TICKS_PER_SECOND, ticks(22)?))
}

/// `(VmRSS, VmSize, Threads)` from /proc/self/status, sizes in bytes.
fn parse_status(status: &str) -> (f64, f64, f64) {
    let (mut rss, mut vsz, mut threads) = (0.0, 0.0, 0.0);
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let number = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match key {
            "VmRSS" => rss = number * 1024.0,
            "VmSize" => vsz = number * 1024.0,
            "Threads" => threads = number,
            _ => {}
        }
    }
    (rss, vsz, threads)
}

/// The soft limit of "Max open files" in /proc/self/limits.
fn parse_max_fds(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Boot time (seconds since the epoch) from /proc/stat, read once.
fn boot_time() -> f64 {
    static BOOT: OnceLock<f64> = OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok())))
            .unwrap_or(0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a ')' must not shift the fields.
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000 200";
        assert_eq!(parse_stat(stat), Some((3.0, 12345.0)));
    }

    #[test]
    fn status_sizes_are_bytes() {
        let status = "Name:\tchatmesh\nVmSize:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t9\n";
        assert_eq!(parse_status(status), (1024.0 * 1024.0, 2048.0 * 1024.0, 9.0));
    }

    #[test]
    fn max_fds_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024.0));
    }

    #[test]
    fn this_process_has_figures() {
        let s = read();
        assert!(s.resident_bytes > 0.0 && s.threads >= 1.0 && s.open_fds >= 3.0 && s.max_fds > 0.0);
        assert!(s.start_time_seconds > 1.6e9, "start time {}", s.start_time_seconds);
    }
}
