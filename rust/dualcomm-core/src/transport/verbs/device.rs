//! Finding the RDMA device and port a rank uses: what the machine has (`probe`, through
//! libibverbs), and which of it the user allows (`Selection`, parsed from
//! `DUALCOMM_IB_DEVICE` with the syntax of NCCL's `NCCL_IB_HCA`). The choice itself is pure
//! (`choose`) and tested without a NIC.

use std::ffi::CStr;

use super::address::PathMtu;
use super::library::{Context, Library};
use crate::error::{Error, Result};

/// The environment variable that restricts the devices and ports a rank may use.
pub const DEVICE_ENV: &str = "DUALCOMM_IB_DEVICE";

/// Ports are numbered from 1; a device has at most a few (queried until one is refused).
const MAX_PORTS: u8 = 8;

/// `ibv_port_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    Other(u32),
}

impl PortState {
    fn from_code(c: u32) -> Self {
        match c {
            1 => Self::Down,
            2 => Self::Init,
            3 => Self::Armed,
            4 | 5 => Self::Active,
            other => Self::Other(other),
        }
    }
}

/// `ibv_port_attr.link_layer`: 1 InfiniBand, 2 Ethernet (RoCE); 0 (unspecified) is
/// InfiniBand for old providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortLink {
    InfiniBand,
    Ethernet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub num: u8,
    pub state: PortState,
    pub link: PortLink,
    pub active_mtu: Option<PathMtu>,
    pub lid: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub ports: Vec<PortInfo>,
}

/// The device and port a rank will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub device: String,
    pub port: PortInfo,
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = match self.port.link {
            PortLink::InfiniBand => format!("InfiniBand, LID {}", self.port.lid),
            PortLink::Ethernet => "RoCE".to_string(),
        };
        let mtu = self.port.active_mtu.map_or(0, PathMtu::bytes);
        write!(
            f,
            "{} port {} ({link}, MTU {mtu})",
            self.device, self.port.num
        )
    }
}

/// One entry of a selection: a device name (a prefix unless the list is exact) and
/// optionally a port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    name: String,
    port: Option<u8>,
}

/// `DUALCOMM_IB_DEVICE`: a comma-separated list of `name[:port]`; a leading `^` excludes the
/// listed devices instead, a leading `=` matches names exactly instead of as prefixes (as
/// `NCCL_IB_HCA`). Empty: every device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    exclude: bool,
    exact: bool,
    patterns: Vec<Pattern>,
}

impl Selection {
    pub fn parse(spec: &str) -> Result<Self> {
        let mut s = spec.trim();
        let exclude = s.starts_with('^');
        if exclude {
            s = &s[1..];
        }
        let exact = s.starts_with('=');
        if exact {
            s = &s[1..];
        }
        let mut patterns = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, port) = match item.split_once(':') {
                Some((n, p)) => {
                    let port = p.parse::<u8>().ok().filter(|&p| p >= 1).ok_or_else(|| {
                        Error::invalid(
                            DEVICE_ENV,
                            "entries of the form name or name:port, with a port from 1",
                            spec,
                        )
                    })?;
                    (n, Some(port))
                }
                None => (item, None),
            };
            if name.is_empty() {
                return Err(Error::invalid(
                    DEVICE_ENV,
                    "a device name in every entry",
                    spec,
                ));
            }
            patterns.push(Pattern {
                name: name.to_string(),
                port,
            });
        }
        Ok(Self {
            exclude,
            exact,
            patterns,
        })
    }

    fn matches(&self, device: &str, port: u8) -> bool {
        let hit = self.patterns.iter().any(|p| {
            let name = if self.exact {
                device == p.name
            } else {
                device.starts_with(&p.name)
            };
            name && p.port.is_none_or(|n| n == port)
        });
        if self.patterns.is_empty() {
            true
        } else {
            hit != self.exclude
        }
    }
}

/// The first active port, in device order, that `sel` allows; otherwise what is missing.
pub fn choose(devices: &[DeviceInfo], sel: &Selection) -> std::result::Result<Chosen, String> {
    if devices.is_empty() {
        return Err("no RDMA device (ibv_get_device_list found none)".into());
    }
    let mut seen = Vec::new();
    for d in devices {
        for p in &d.ports {
            if !sel.matches(&d.name, p.num) {
                continue;
            }
            if p.state == PortState::Active {
                return Ok(Chosen {
                    device: d.name.clone(),
                    port: p.clone(),
                });
            }
            seen.push(format!("{}:{} is {:?}", d.name, p.num, p.state));
        }
    }
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    if seen.is_empty() {
        Err(format!(
            "no device port that {DEVICE_ENV} allows (devices: {})",
            names.join(", ")
        ))
    } else {
        Err(format!("no active port ({})", seen.join(", ")))
    }
}

/// Offsets in `ibv_port_attr` (verbs.h; the exported `ibv_query_port` fills the fields up
/// to `link_layer`, which are laid out the same in every rdma-core release; checked against
/// the installed header with the rest of `abi`).
pub mod port_attr {
    pub const STATE: usize = 0;
    pub const ACTIVE_MTU: usize = 8;
    pub const LID: usize = 34;
    pub const LINK_LAYER: usize = 46;
    /// Room for the whole structure of any release.
    pub const BYTES: usize = 256;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes a filled `ibv_port_attr`.
pub fn decode_port(num: u8, b: &[u8]) -> PortInfo {
    use port_attr::*;
    PortInfo {
        num,
        state: PortState::from_code(u32_at(b, STATE)),
        link: if b[LINK_LAYER] == 2 {
            PortLink::Ethernet
        } else {
            PortLink::InfiniBand
        },
        active_mtu: PathMtu::from_code(u32_at(b, ACTIVE_MTU) as u16),
        lid: u16::from_ne_bytes([b[LID], b[LID + 1]]),
    }
}

/// Opens every device libibverbs lists, in order, and hands `visit` its name and context
/// (null if it would not open) until `visit` returns something, which keeps that context;
/// the others are closed here.
fn each_device<R>(
    lib: &Library,
    mut visit: impl FnMut(&str, *mut Context) -> Option<R>,
) -> std::result::Result<Option<R>, String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a null-terminated array (or
    // null with errno set), freed below.
    let list = unsafe { (lib.get_device_list)(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        // ENOSYS: the kernel has no RDMA subsystem at all (no uverbs devices can exist).
        return Err(if e.raw_os_error() == Some(libc::ENOSYS) {
            format!("no RDMA device: this kernel has no RDMA support (ibv_get_device_list: {e})")
        } else {
            format!("ibv_get_device_list failed: {e}")
        });
    }
    let mut found = None;
    for i in 0..n.max(0) as usize {
        // SAFETY: `list` holds `n` device pointers, each with a NUL-terminated name.
        let (dev, name) = unsafe {
            let dev = *list.add(i);
            (
                dev,
                CStr::from_ptr((lib.get_device_name)(dev))
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        // SAFETY: a listed device; its context outlives the list.
        let ctx = unsafe { (lib.open_device)(dev) };
        let got = visit(&name, ctx);
        if got.is_none() && !ctx.is_null() {
            // SAFETY: opened above, no objects made on it.
            unsafe { (lib.close_device)(ctx) };
        }
        if got.is_some() {
            found = got;
            break;
        }
    }
    // SAFETY: returned by ibv_get_device_list; no device pointer is kept.
    unsafe { (lib.free_device_list)(list) };
    Ok(found)
}

/// Every device libibverbs lists, with its ports' state.
pub fn probe(lib: &Library) -> std::result::Result<Vec<DeviceInfo>, String> {
    let mut devices = Vec::new();
    each_device::<()>(lib, |name, ctx| {
        let mut ports = Vec::new();
        if !ctx.is_null() {
            for num in 1..=MAX_PORTS {
                let mut attr = [0u8; port_attr::BYTES];
                // SAFETY: an open context; `attr` is larger than any release's ibv_port_attr.
                let rc = unsafe { (lib.query_port)(ctx, num, attr.as_mut_ptr().cast()) };
                if rc != 0 {
                    break;
                }
                ports.push(decode_port(num, &attr));
            }
        }
        devices.push(DeviceInfo {
            name: name.to_string(),
            ports,
        });
        None
    })?;
    Ok(devices)
}

/// Opens the device called `name`: its context, to be closed with `close_device`.
pub fn open_by_name(lib: &Library, name: &str) -> std::result::Result<*mut Context, String> {
    let opened = each_device(lib, |this, ctx| {
        if this != name {
            return None;
        }
        let err = std::io::Error::last_os_error();
        let got = if ctx.is_null() {
            Err(format!("ibv_open_device({name}) failed: {err}"))
        } else {
            Ok(ctx)
        };
        Some(got)
    })?;
    opened.unwrap_or_else(|| Err(format!("no RDMA device called {name}")))
}

/// The device and port this rank would use, or `TransportUnavailable` saying what is
/// missing: libibverbs, a device, or an active port that `spec` allows.
pub fn find(spec: Option<&str>) -> Result<Chosen> {
    let sel = Selection::parse(spec.unwrap_or(""))?;
    let unavailable = |reason: String| Error::TransportUnavailable {
        transport: "verbs".into(),
        reason,
    };
    let lib = Library::get().map_err(unavailable)?;
    let devices = probe(lib).map_err(unavailable)?;
    choose(&devices, &sel).map_err(unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(num: u8, state: PortState) -> PortInfo {
        PortInfo {
            num,
            state,
            link: PortLink::InfiniBand,
            active_mtu: Some(PathMtu::Mtu4096),
            lid: 7,
        }
    }

    fn devices() -> Vec<DeviceInfo> {
        vec![
            DeviceInfo {
                name: "mlx5_0".into(),
                ports: vec![port(1, PortState::Down)],
            },
            DeviceInfo {
                name: "mlx5_1".into(),
                ports: vec![port(1, PortState::Active), port(2, PortState::Active)],
            },
            DeviceInfo {
                name: "mlx5_10".into(),
                ports: vec![port(1, PortState::Active)],
            },
        ]
    }

    fn pick(spec: &str) -> std::result::Result<(String, u8), String> {
        choose(&devices(), &Selection::parse(spec).unwrap()).map(|c| (c.device, c.port.num))
    }

    #[test]
    fn the_first_active_port_wins_without_a_selection() {
        assert_eq!(pick(""), Ok(("mlx5_1".into(), 1)));
    }

    #[test]
    fn names_are_prefixes_unless_exact() {
        assert_eq!(pick("mlx5_1:2"), Ok(("mlx5_1".into(), 2)));
        // "mlx5_1" is a prefix of "mlx5_10" too, and mlx5_1 comes first.
        assert_eq!(pick("mlx5_1"), Ok(("mlx5_1".into(), 1)));
        assert_eq!(pick("=mlx5_10"), Ok(("mlx5_10".into(), 1)));
        assert_eq!(pick("^mlx5_1:1"), Ok(("mlx5_1".into(), 2)));
        assert_eq!(pick("^=mlx5_1"), Ok(("mlx5_10".into(), 1)));
    }

    #[test]
    fn what_is_missing_is_said() {
        let down = pick("mlx5_0").unwrap_err();
        assert!(
            down.contains("no active port") && down.contains("mlx5_0:1 is Down"),
            "{down}"
        );
        let none = pick("=mlx5").unwrap_err();
        assert!(
            none.contains("no device port that DUALCOMM_IB_DEVICE allows"),
            "{none}"
        );
        let empty = choose(&[], &Selection::default()).unwrap_err();
        assert!(empty.contains("no RDMA device"), "{empty}");
    }

    #[test]
    fn bad_selections_name_the_variable() {
        for bad in ["mlx5_0:0", "mlx5_0:x", ":1", "a,:2"] {
            let e = Selection::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(DEVICE_ENV) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn port_attributes_decode_at_verbs_h_offsets() {
        let mut b = [0u8; port_attr::BYTES];
        b[port_attr::STATE..][..4].copy_from_slice(&4u32.to_ne_bytes());
        b[port_attr::ACTIVE_MTU..][..4].copy_from_slice(&3u32.to_ne_bytes());
        b[port_attr::LID..][..2].copy_from_slice(&0x1234u16.to_ne_bytes());
        b[port_attr::LINK_LAYER] = 2;
        let p = decode_port(1, &b);
        assert_eq!(p.state, PortState::Active);
        assert_eq!(p.active_mtu, Some(PathMtu::Mtu1024));
        assert_eq!(p.lid, 0x1234);
        assert_eq!(p.link, PortLink::Ethernet);
    }

    /// On this machine: whatever libibverbs finds, `find` either picks an active port or
    /// says which part is missing (the rust-ibverbs crate's tests skip without a device the
    /// same way).
    #[test]
    fn find_names_what_is_missing_or_a_port() {
        match find(None) {
            Ok(c) => assert_eq!(c.port.state, PortState::Active),
            Err(Error::TransportUnavailable { transport, reason }) => {
                assert_eq!(transport, "verbs");
                assert!(
                    reason.contains("libibverbs is not installed")
                        || reason.contains("no RDMA device")
                        || reason.contains("no active port")
                        || reason.contains("ibv_get_device_list failed"),
                    "{reason}"
                );
            }
            Err(other) => panic!("{other}"),
        }
    }
}
