//! Processes under test: started pinned to a core, measured from /proc, killed when dropped.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Clock ticks per second of /proc's utime and stime (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU seconds of a process (all its threads), from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(parse_stat(&stat)?.1)
}

/// CPU seconds of a process's threads so far, summed by thread name, from
/// /proc/<pid>/task/*/stat. A thread that ended is missing (its time with it); one that ends
/// while this reads is skipped.
pub fn thread_cpu_seconds(pid: u32) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut by_name = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing /proc/{pid}/task"))?;
    for task in tasks {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue; // the thread ended
        };
        let (name, seconds) = parse_stat(&stat)?;
        *by_name.entry(name.to_owned()).or_insert(0.0) += seconds;
    }
    Ok(by_name)
}

/// The command name and user plus system CPU seconds of a /proc `stat` line.
fn parse_stat(stat: &str) -> Result<(&str, f64)> {
    // The command name is in parentheses and may hold spaces and parentheses: fields start
    // after the last ')'.
    let (head, rest) = stat.rsplit_once(')').context("malformed /proc stat")?;
    let name = head
        .split_once('(')
        .map(|(_, n)| n)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the full line, so utime (14) is index 11 here.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((name, (utime + stime) / clock_ticks_cached()))
}

/// The machine's CPU time so far from the `cpu` line of /proc/stat, in clock ticks summed over
/// every core: all of it (`user nice system idle iowait irq softirq steal`) and the part the
/// hypervisor gave to other guests while this machine wanted to run ("steal"). On a shared
/// virtual machine, a window with steal in it is slower for reasons outside the systems under
/// test.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks {
    pub total: f64,
    pub steal: f64,
}

impl CpuTicks {
    pub fn now() -> Result<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
    }

    fn parse(stat: &str) -> Result<Self> {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
            .context("no cpu line in /proc/stat")?;
        let fields: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("a cpu figure in /proc/stat is not a number")?;
        if fields.len() < 8 {
            bail!("no steal column in /proc/stat (kernel older than 2.6.11)");
        }
        Ok(Self {
            total: fields.iter().sum(),
            steal: fields[7],
        })
    }

    /// Steal since `earlier` as a share of all the machine's CPU time meanwhile (100% = every
    /// core stolen all along). Counted from the same line as the steal, so it needs no core
    /// count (the harness pins itself to one core, which narrows what it sees of the machine).
    pub fn steal_pct_since(self, earlier: Self) -> f64 {
        let total = self.total - earlier.total;
        if total <= 0.0 {
            return 0.0;
        }
        (self.steal - earlier.steal) / total * 100.0
    }
}

/// Packets this machine has sent: UDP datagrams and TCP segments, from /proc/net/snmp. On
/// loopback every packet is sent once, by the client or by the server, so the change over a
/// window counts both directions of a benchmark's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PacketsSent {
    pub udp: u64,
    pub tcp: u64,
    /// UDP datagrams dropped because a socket's receive buffer was full (`RcvbufErrors`).
    pub udp_dropped: u64,
}

impl PacketsSent {
    pub fn now() -> Result<Self> {
        Self::parse(&std::fs::read_to_string("/proc/net/snmp").context("reading /proc/net/snmp")?)
    }

    /// Reads `Udp: OutDatagrams` and `Tcp: OutSegs` (each protocol is a header line of field
    /// names followed by a line of values).
    fn parse(snmp: &str) -> Result<Self> {
        let field = |proto: &str, name: &str| -> Result<u64> {
            let prefix = format!("{proto}:");
            let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
            let (names, values) = (lines.next(), lines.next());
            let (Some(names), Some(values)) = (names, values) else {
                anyhow::bail!("no {proto} lines in /proc/net/snmp");
            };
            let at = names
                .split_whitespace()
                .position(|n| n == name)
                .with_context(|| format!("no {proto} {name} in /proc/net/snmp"))?;
            let value = values
                .split_whitespace()
                .nth(at)
                .with_context(|| format!("no value for {proto} {name}"))?;
            Ok(value.parse()?)
        };
        Ok(Self {
            udp: field("Udp", "OutDatagrams")?,
            tcp: field("Tcp", "OutSegs")?,
            udp_dropped: field("Udp", "RcvbufErrors")?,
        })
    }

    /// Packets sent since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            udp: self.udp.saturating_sub(earlier.udp),
            tcp: self.tcp.saturating_sub(earlier.tcp),
            udp_dropped: self.udp_dropped.saturating_sub(earlier.udp_dropped),
        }
    }
}

fn clock_ticks_cached() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(clock_ticks)
}

/// Resident set size of a process in bytes, from /proc/<pid>/status.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// Pins the calling thread (and the threads it starts later) to `core`.
pub fn pin_current_thread(core: usize) -> Result<()> {
    // /proc/thread-self links to <pid>/task/<tid>.
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .context("no thread id")?
        .to_owned();
    let status = Command::new("taskset")
        .args(["-p", "-c", &core.to_string(), &tid])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset -p -c {core} {tid} failed");
    }
    Ok(())
}

/// Raises this process's open-file limit as far as allowed (thousands of TCP clients need
/// thousands of sockets); returns the limit in force.
pub fn raise_nofile(wanted: u64) -> u64 {
    let pid = std::process::id().to_string();
    for limit in [wanted, 262_144, 65_536] {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={limit}:{limit}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return limit;
        }
    }
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The CPUs this machine has.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A free UDP port on 127.0.0.1 (bound then released; the caller binds it right away).
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free TCP port on 127.0.0.1 (bound then released; the caller binds it right away).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A server process under test, pinned to a core; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `program args` under `taskset -c core`; stdout is kept for [`Proc::ready_line`].
    pub fn spawn(name: &str, core: Option<usize>, program: &Path, args: &[String]) -> Result<Proc> {
        // FLEETLINK_BENCH_WRAP (e.g. "heaptrack" or "perf record -g --") runs fleetlink's server
        // under a profiler; its figures are then the profiler's, for reading profiles only.
        let wrap: Vec<String> = match std::env::var("FLEETLINK_BENCH_WRAP") {
            Ok(w) if name == "fleetlink" => w.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let mut cmd = match core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(core.to_string()).args(&wrap).arg(program);
                c
            }
            None if wrap.is_empty() => Command::new(program),
            None => {
                let mut c = Command::new(&wrap[0]);
                c.args(&wrap[1..]).arg(program);
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id (taskset execs the program, so this is the server itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first stdout line starting with `prefix` and returns the rest of it.
    pub fn ready_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let stdout = self.child.stdout.take().context("stdout already taken")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let prefix = prefix.to_owned();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if !sent && let Some(rest) = line.strip_prefix(&prefix) {
                    let _ = tx.send(rest.trim().to_owned());
                    sent = true;
                }
            }
        });
        rx.recv_timeout(timeout)
            .with_context(|| format!("{} did not become ready within {timeout:?}", self.name))
    }

    /// Waits until `addr` accepts TCP connections (for servers that print nothing).
    pub fn wait_tcp(&mut self, addr: std::net::SocketAddr, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited during start-up ({status})", self.name);
            }
            if start.elapsed() > timeout {
                bail!("{} did not listen on {addr} within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20)); // polling a port: nothing to wait on
        }
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }

    pub fn thread_cpu_seconds(&self) -> Result<std::collections::BTreeMap<String, f64>> {
        thread_cpu_seconds(self.pid())
    }

    pub fn rss_bytes(&self) -> Result<u64> {
        rss_bytes(self.pid())
    }

    /// Closes its stdin (the bench servers shut down gracefully on that) and waits for it to exit.
    pub fn stop_gracefully(&mut self, timeout: Duration) -> Result<()> {
        drop(self.child.stdin.take());
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > timeout {
                self.kill();
                bail!("{} did not stop within {timeout:?}; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(10)); // no portable wait-with-timeout
        }
        Ok(())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_thread_name_and_cpu_time() {
        let ticks = clock_ticks_cached();
        let line = "4242 (fleetlink (x) 1) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 3 0";
        let (name, seconds) = parse_stat(line).unwrap();
        assert_eq!(name, "fleetlink (x) 1");
        assert!((seconds - 300.0 / ticks).abs() < 1e-9, "{seconds}");
        assert!(parse_stat("4242 fleetlink S 1").is_err());
    }

    #[test]
    fn a_process_cpu_time_is_split_by_thread_name() {
        let pid = std::process::id();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::Builder::new()
            .name("cpu-burner".into())
            .spawn(move || {
                let start = Instant::now();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                spun_tx.send(()).unwrap();
                // alive while the test reads its time
                let _ = done_rx.recv();
            })
            .unwrap();
        spun_rx.recv().unwrap();
        let threads = thread_cpu_seconds(pid).unwrap();
        let total = cpu_seconds(pid).unwrap();
        done_tx.send(()).unwrap();
        burner.join().unwrap();
        let burned = threads.get("cpu-burner").copied().unwrap_or_default();
        // 300 ms of spinning: at least a tenth of it on the CPU however busy the machine is
        assert!(burned >= 0.03, "{threads:?}");
        let summed: f64 = threads.values().sum();
        assert!(summed <= total + 0.05, "{summed} by thread, {total} in all");
    }

    #[test]
    fn packets_sent_are_read_by_field_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 2 64\n\
Tcp: RtoAlgorithm InSegs OutSegs RetransSegs\nTcp: 1 5094 3074 7\n\
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 17108595 35305 488145 17655811 488144\n\
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdpLite: 1 2 3 4 5\n";
        let p = PacketsSent::parse(snmp).unwrap();
        assert_eq!(
            p,
            PacketsSent {
                udp: 17_655_811,
                tcp: 3_074,
                udp_dropped: 488_144
            }
        );
        let later = PacketsSent {
            udp: p.udp + 30,
            tcp: p.tcp + 4,
            udp_dropped: p.udp_dropped,
        };
        assert_eq!(
            later.since(p),
            PacketsSent {
                udp: 30,
                tcp: 4,
                udp_dropped: 0
            }
        );
        let err = PacketsSent::parse("Ip: a\nIp: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no Udp lines"), "{err}");
    }

    #[test]
    fn steal_is_a_share_of_the_cpu_line_s_own_total() {
        let before = CpuTicks::parse(
            "cpu  2255 34 2290 22625563 6290 127 456 931 0 0\n\
cpu0 1132 34 1441 11311718 3675 127 438 500 0 0\nintr 114930548 113199788 3\n",
        )
        .unwrap();
        assert_eq!(before.steal, 931.0);
        assert_eq!(
            before.total,
            (2255 + 34 + 2290 + 22625563 + 6290 + 127 + 456 + 931) as f64
        );
        // two cores over 1 s (200 ticks): 50 stolen is 25%, however many cores this sees
        let after = CpuTicks {
            total: before.total + 200.0,
            steal: before.steal + 50.0,
        };
        assert_eq!(after.steal_pct_since(before), 25.0);
        assert_eq!(before.steal_pct_since(before), 0.0);
        let err = CpuTicks::parse("cpu  1 2 3\n").unwrap_err().to_string();
        assert!(err.contains("no steal column"), "{err}");
        let err = CpuTicks::parse("intr 1 2\n").unwrap_err().to_string();
        assert!(err.contains("no cpu line"), "{err}");
        let now = CpuTicks::now().unwrap();
        assert!(now.total > 0.0 && now.steal >= 0.0);
    }

    #[test]
    fn a_datagram_sent_on_loopback_is_counted() {
        let before = PacketsSent::now().unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"ping", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rx.recv(&mut buf).unwrap(), 4);
        assert!(PacketsSent::now().unwrap().since(before).udp >= 1);
    }
}
