//! CPU-count detection: how many workers the cluster should start by default.
//!
//! The logical count is the process's affinity mask capped by its cgroup CPU quota (v2 `cpu.max` or
//! v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, checked on the cgroup and all its ancestors). The physical
//! count additionally collapses hyperthread siblings using `/sys/devices/system/cpu/cpuN/topology`.

use std::collections::HashSet;
use std::num::NonZero;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::{env, fs, thread};

use rustix::thread::{CpuSet, sched_getaffinity};
use tracing::warn;

/// Environment variable that overrides the logical CPU count returned by [`cpus`].
const OVERRIDE_VAR: &str = "ECEWO_CLUSTER_CPUS";

/// Where a CPU count came from (for a start-up log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuSource {
    /// The `ECEWO_CLUSTER_CPUS` environment variable.
    Override,
    /// The scheduler affinity mask (no cgroup quota was tighter).
    Affinity,
    /// A cgroup CPU quota that is tighter than the affinity mask.
    CgroupQuota,
    /// The affinity mask could not be read; `std::thread::available_parallelism` was used instead.
    Fallback,
}

/// A detected CPU count and its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuCount {
    /// Number of CPUs, always at least 1.
    pub count: usize,
    /// Where `count` came from.
    pub source: CpuSource,
}

/// Logical CPUs this process may use: the `sched_getaffinity` mask, capped by the cgroup v2 `cpu.max`
/// quota (or cgroup v1 `cpu.cfs_quota_us / cpu.cfs_period_us`) of the process's cgroup and its ancestors,
/// rounded up, at least 1.
///
/// The environment variable `ECEWO_CLUSTER_CPUS` (a positive integer) overrides detection; an invalid
/// value is ignored with a warning.
pub fn cpus() -> usize {
    cpus_detailed().count
}

/// Same as [`cpus`], together with where the number came from.
pub fn cpus_detailed() -> CpuCount {
    let value = env::var_os(OVERRIDE_VAR).map(|v| v.to_string_lossy().into_owned());
    if let Some(count) = parse_override(value.as_deref()) {
        return CpuCount { count, source: CpuSource::Override };
    }
    allowed_cpus().map_or_else(fallback, |allowed| detect(&Roots::default(), &allowed))
}

/// Physical cores: distinct (`physical_package_id`, `core_id`) pairs among the CPUs in the affinity
/// mask, read from `/sys/devices/system/cpu/cpuN/topology`; capped by the cgroup quota (rounded up);
/// at least 1.
///
/// When the topology is unreadable this falls back to the detected logical count. Unlike [`cpus`],
/// `ECEWO_CLUSTER_CPUS` does **not** override this value (not even in the fallback).
pub fn cpus_physical() -> usize {
    allowed_cpus().map_or_else(|| fallback().count, |allowed| detect_physical(&Roots::default(), &allowed))
}

/// Filesystem locations the detection reads; tests point them into a fixture tree.
struct Roots {
    /// Root against which absolute mount points from `mountinfo` are resolved.
    root: PathBuf,
    /// procfs mount (`/proc`).
    proc_: PathBuf,
    /// sysfs mount (`/sys`).
    sys: PathBuf,
}

impl Roots {
    fn under(root: &Path) -> Self {
        Self { root: root.to_path_buf(), proc_: root.join("proc"), sys: root.join("sys") }
    }
}

impl Default for Roots {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

/// Parses the `ECEWO_CLUSTER_CPUS` value; unset or empty means "no override".
fn parse_override(value: Option<&str>) -> Option<usize> {
    let value = value?.trim();
    if value.is_empty() {
        return None;
    }
    match value.parse() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            warn!(value, "ignoring {OVERRIDE_VAR}: expected a positive integer");
            None
        }
    }
}

/// CPU numbers in this process's affinity mask.
fn allowed_cpus() -> Option<Vec<usize>> {
    match sched_getaffinity(None) {
        Ok(set) => Some((0..CpuSet::MAX_CPU).filter(|&cpu| set.is_set(cpu)).collect()),
        Err(err) => {
            warn!(%err, "sched_getaffinity failed; using available_parallelism");
            None
        }
    }
}

/// Used when the affinity mask is unreadable (std applies its own cgroup quota logic).
fn fallback() -> CpuCount {
    let count = thread::available_parallelism().map_or(1, NonZero::get);
    CpuCount { count, source: CpuSource::Fallback }
}

/// Logical count for the `allowed` CPUs, capped by the cgroup quota.
fn detect(roots: &Roots, allowed: &[usize]) -> CpuCount {
    let affinity = allowed.len().max(1);
    match cgroup_limit(roots) {
        Some(limit) if limit < affinity => CpuCount { count: limit, source: CpuSource::CgroupQuota },
        _ => CpuCount { count: affinity, source: CpuSource::Affinity },
    }
}

/// Physical-core count for the `allowed` CPUs, capped like the logical count.
fn detect_physical(roots: &Roots, allowed: &[usize]) -> usize {
    let logical = detect(roots, allowed).count;
    physical_cores(&roots.sys, allowed).map_or(logical, |cores| cores.min(logical))
}

/// Distinct (package, core) pairs among `allowed`; `None` if any CPU's topology is unreadable.
fn physical_cores(sys: &Path, allowed: &[usize]) -> Option<usize> {
    let mut cores = HashSet::new();
    for cpu in allowed {
        let topology = sys.join(format!("devices/system/cpu/cpu{cpu}/topology"));
        let id = |name| read_num::<i64>(&topology.join(name));
        cores.insert((id("physical_package_id")?, id("core_id")?));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Tightest CPU limit over every cgroup hierarchy listed in `<proc>/self/cgroup` (v2 and v1 alike,
/// so hybrid setups work).
fn cgroup_limit(roots: &Roots) -> Option<usize> {
    let cgroups = fs::read_to_string(roots.proc_.join("self/cgroup")).ok()?;
    cgroups
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let path = Path::new(path);
            if id == "0" && controllers.is_empty() {
                let mount = roots.sys.join("fs/cgroup");
                nested_limit(&mount, path.strip_prefix("/").ok(), cgroup2_limit)
            } else if controllers.split(',').any(|c| c == "cpu") {
                let (mount_root, mount) = cgroup1_cpu_mount(roots)?;
                nested_limit(&mount, path.strip_prefix(mount_root).ok(), cgroup1_limit)
            } else {
                None
            }
        })
        .min()
}

/// Smallest limit on the cgroup directory `mount/rel` and each parent up to `mount`. If `rel` is
/// unknown or missing (containers often mount their own cgroup as the root), only `mount` is checked.
fn nested_limit(mount: &Path, rel: Option<&Path>, limit: fn(&Path) -> Option<usize>) -> Option<usize> {
    let dir = rel
        .filter(|rel| rel.components().all(|c| matches!(c, Component::Normal(_))))
        .map(|rel| mount.join(rel))
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| mount.to_path_buf());
    dir.ancestors().take_while(|d| d.starts_with(mount)).filter_map(limit).min()
}

/// cgroup v2 `cpu.max` (`max 100000` or `150000 100000`) in directory `dir`.
fn cgroup2_limit(dir: &Path) -> Option<usize> {
    let text = fs::read_to_string(dir.join("cpu.max")).ok()?;
    let mut fields = text.split_whitespace();
    let quota = fields.next()?.parse().ok()?; // "max" fails here: unlimited
    quota_cpus(quota, fields.next()?.parse().ok()?)
}

/// cgroup v1 `cpu.cfs_quota_us / cpu.cfs_period_us` in directory `dir` (quota -1 = unlimited).
fn cgroup1_limit(dir: &Path) -> Option<usize> {
    let quota = read_num::<i64>(&dir.join("cpu.cfs_quota_us"))?;
    quota_cpus(quota.try_into().ok()?, read_num(&dir.join("cpu.cfs_period_us"))?)
}

/// `ceil(quota / period)`, at least 1; `None` for a zero period.
fn quota_cpus(quota: u64, period: u64) -> Option<usize> {
    let cpus = (period > 0).then(|| quota.div_ceil(period))?;
    Some(usize::try_from(cpus).unwrap_or(usize::MAX).max(1))
}

/// The cgroup v1 `cpu` controller mount from `<proc>/self/mountinfo`: (root within the hierarchy,
/// mount point resolved under `roots.root`).
fn cgroup1_cpu_mount(roots: &Roots) -> Option<(PathBuf, PathBuf)> {
    let mountinfo = fs::read_to_string(roots.proc_.join("self/mountinfo")).ok()?;
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - fstype source super-options`
        let (mount, fs_info) = line.split_once(" - ")?;
        let mut fs_info = fs_info.split(' ');
        let (fstype, super_options) = (fs_info.next()?, fs_info.nth(1)?);
        if fstype != "cgroup" || !super_options.split(',').any(|o| o == "cpu") {
            return None;
        }
        let mut mount = mount.split(' ').skip(3);
        let (root, point) = (unescape(mount.next()?), unescape(mount.next()?));
        Some((PathBuf::from(root), roots.root.join(point.trim_start_matches('/'))))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash, ...).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        let escaped = tail
            .get(..3)
            .filter(|_| byte == b'\\')
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        out.push(escaped.unwrap_or(byte));
        rest = if escaped.is_some() { &tail[3..] } else { tail };
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a file holding a single number; `None` if missing or malformed.
fn read_num<T: FromStr>(path: &Path) -> Option<T> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A throw-away directory tree under the system temp dir, removed on drop.
    struct Fixture(PathBuf);

    impl Fixture {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = env::temp_dir().join(format!("ecewo-cpu-test-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, rel: &str, contents: &str) -> &Self {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
            self
        }

        fn topology(&self, cpu: usize, package: usize, core: usize) -> &Self {
            let dir = format!("sys/devices/system/cpu/cpu{cpu}/topology");
            self.write(&format!("{dir}/physical_package_id"), &format!("{package}\n"))
                .write(&format!("{dir}/core_id"), &format!("{core}\n"))
        }

        fn roots(&self) -> Roots {
            Roots::under(&self.0)
        }

        fn logical(&self, allowed: &[usize]) -> CpuCount {
            detect(&self.roots(), allowed)
        }

        fn physical(&self, allowed: &[usize]) -> usize {
            detect_physical(&self.roots(), allowed)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const V1_MOUNTINFO: &str = "\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
29 25 0:25 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
";

    fn affinity(n: usize) -> CpuCount {
        CpuCount { count: n, source: CpuSource::Affinity }
    }

    fn quota(n: usize) -> CpuCount {
        CpuCount { count: n, source: CpuSource::CgroupQuota }
    }

    #[test]
    fn two_sockets_with_hyperthreads() {
        let fx = Fixture::new();
        // cpuN: package N/4, core (N/2)%2 -> core ids 0,1 repeat on both packages.
        (0..8).for_each(|cpu| _ = fx.topology(cpu, cpu / 4, (cpu / 2) % 2));
        let all: Vec<_> = (0..8).collect();
        assert_eq!(fx.logical(&all), affinity(8));
        assert_eq!(fx.physical(&all), 4);
    }

    #[test]
    fn holes_in_cpu_numbering() {
        let fx = Fixture::new();
        (0..8).for_each(|cpu| _ = fx.topology(cpu, cpu / 4, (cpu / 2) % 2));
        let allowed = [0, 1, 4, 5]; // one hyperthreaded core on each package
        assert_eq!(fx.logical(&allowed), affinity(4));
        assert_eq!(fx.physical(&allowed), 2);
    }

    #[test]
    fn cgroup_v2_quota() {
        let fx = Fixture::new();
        fx.write("proc/self/cgroup", "0::/app.slice/web\n")
            .write("sys/fs/cgroup/app.slice/web/cpu.max", "150000 100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(2));
        // A quota above the affinity count does not change the source.
        assert_eq!(fx.logical(&[0]), affinity(1));

        fx.write("sys/fs/cgroup/app.slice/web/cpu.max", "max 100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), affinity(4));
    }

    #[test]
    fn cgroup_v2_nested_limits() {
        let fx = Fixture::new();
        fx.write("proc/self/cgroup", "0::/outer/inner\n")
            .write("sys/fs/cgroup/outer/cpu.max", "100000 100000\n")
            .write("sys/fs/cgroup/outer/inner/cpu.max", "300000 100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(1), "tighter parent wins");

        fx.write("sys/fs/cgroup/outer/cpu.max", "max 100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(3), "child limit applies");

        // A path missing from the mount (foreign namespace) falls back to the mount root.
        fx.write("proc/self/cgroup", "0::/elsewhere\n").write("sys/fs/cgroup/cpu.max", "200000 100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(2));
    }

    #[test]
    fn cgroup_v1_quota() {
        let fx = Fixture::new();
        let dir = "sys/fs/cgroup/cpu,cpuacct/docker/abc";
        fx.write("proc/self/cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
            .write("proc/self/mountinfo", V1_MOUNTINFO)
            .write(&format!("{dir}/cpu.cfs_quota_us"), "50000\n")
            .write(&format!("{dir}/cpu.cfs_period_us"), "100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(1));

        fx.write(&format!("{dir}/cpu.cfs_quota_us"), "-1\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), affinity(4));
    }

    #[test]
    fn cgroup_v1_container_mounts_its_own_cgroup() {
        let fx = Fixture::new();
        let mountinfo = V1_MOUNTINFO.replace("0:26 / /sys", "0:26 /docker/abc /sys");
        let dir = "sys/fs/cgroup/cpu,cpuacct";
        fx.write("proc/self/cgroup", "4:cpu,cpuacct:/docker/abc\n")
            .write("proc/self/mountinfo", &mountinfo)
            .write(&format!("{dir}/cpu.cfs_quota_us"), "250000\n")
            .write(&format!("{dir}/cpu.cfs_period_us"), "100000\n");
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(3));

        // Mount root "/" but the cgroup path does not exist under the mount: use the mount root.
        fx.write("proc/self/mountinfo", V1_MOUNTINFO);
        assert_eq!(fx.logical(&[0, 1, 2, 3]), quota(3));
    }

    #[test]
    fn hyperthreads_capped_by_quota() {
        let fx = Fixture::new();
        (0..4).for_each(|cpu| _ = fx.topology(cpu, 0, cpu / 2));
        let all = [0, 1, 2, 3];
        assert_eq!(fx.physical(&all), 2);

        fx.write("proc/self/cgroup", "0::/\n").write("sys/fs/cgroup/cpu.max", "100000 100000\n");
        assert_eq!(fx.logical(&all), quota(1));
        assert_eq!(fx.physical(&all), 1);
    }

    #[test]
    fn malformed_and_missing_files() {
        let fx = Fixture::new();
        let all = [0, 1, 2, 3];
        // Nothing at all: affinity only; no topology falls back to the logical count.
        assert_eq!(fx.logical(&all), affinity(4));
        assert_eq!(fx.physical(&all), 4);
        assert_eq!(fx.logical(&[]), affinity(1));
        assert_eq!(fx.physical(&[]), 1);

        fx.write("proc/self/cgroup", "garbage\n\n0::/a\n");
        for bad in ["garbage", "150000", "150000 0", "-5 100000", ""] {
            fx.write("sys/fs/cgroup/a/cpu.max", bad);
            assert_eq!(fx.logical(&all), affinity(4), "cpu.max {bad:?}");
        }
        // A zero quota still means at least one CPU.
        fx.write("sys/fs/cgroup/a/cpu.max", "0 100000");
        assert_eq!(fx.logical(&all), quota(1));

        fx.write("proc/self/cgroup", "4:cpu:/x\n")
            .write("proc/self/mountinfo", "nonsense\n30 25 0:26 / /cg rw - cgroup cgroup rw,cpu\n")
            .write("cg/x/cpu.cfs_quota_us", "lots")
            .write("cg/x/cpu.cfs_period_us", "100000");
        assert_eq!(fx.logical(&all), affinity(4));

        // Partial topology (cpu3 lacks core_id) falls back to the logical count.
        (0..3).for_each(|cpu| _ = fx.topology(cpu, 0, 0));
        fx.write("sys/devices/system/cpu/cpu3/topology/physical_package_id", "0");
        assert_eq!(fx.physical(&all), 4);
        fx.write("sys/devices/system/cpu/cpu3/topology/core_id", "zero");
        assert_eq!(fx.physical(&all), 4);
        fx.write("sys/devices/system/cpu/cpu3/topology/core_id", "0\n");
        assert_eq!(fx.physical(&all), 1);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/tail\04"), r"/tail\04");
        assert_eq!(unescape(r"\777\9"), r"\777\9");
    }

    #[test]
    fn override_parser() {
        assert_eq!(parse_override(None), None);
        assert_eq!(parse_override(Some("")), None);
        assert_eq!(parse_override(Some("4")), Some(4));
        assert_eq!(parse_override(Some(" 12\n")), Some(12));
        for bad in ["0", "-3", "two", "1.5", "+"] {
            assert_eq!(parse_override(Some(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn real_system() {
        let logical = cpus();
        let physical = cpus_physical();
        assert!(logical >= 1 && physical >= 1);
        if let Some(allowed) = allowed_cpus() {
            assert!(physical <= allowed.len().max(1));
        }
        assert_eq!(cpus_detailed().count, logical);
    }
}
