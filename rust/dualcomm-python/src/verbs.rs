//! The verbs transport's set-up and connection for the binding. A build without the cargo
//! feature `verbs` keeps the same Python API, and every way in says that the build lacks it.

use dualcomm_core::transport::shm::ShmSegment;
#[cfg(feature = "verbs")]
use dualcomm_core::transport::verbs::setup::VerbsOptions;
#[cfg(feature = "verbs")]
pub use dualcomm_core::transport::verbs::setup::VerbsSetup;
use dualcomm_core::{Config, Endpoint, Error, Topology};

#[cfg(feature = "verbs")]
pub fn open_verbs(
    topo: &Topology,
    rank: usize,
    config: &Config,
    rdma_only: bool,
) -> Result<VerbsSetup, Error> {
    let options = VerbsOptions::from_env()?;
    Endpoint::verbs_setup(topo, rank, config, rdma_only, &options)
}

/// Verbs for every link, or (with a segment and its job) shared memory inside nodes and
/// verbs between them.
#[cfg(feature = "verbs")]
pub fn join_verbs(
    shm: Option<(ShmSegment, String)>,
    setup: VerbsSetup,
    cards: &[Vec<u8>],
    topo: Topology,
    config: Config,
) -> Result<Endpoint, Error> {
    match shm {
        Some((seg, job)) => Endpoint::shm_verbs(seg, &job, setup, cards, topo, config),
        None => Endpoint::verbs(setup, cards, topo, config),
    }
}

#[cfg(not(feature = "verbs"))]
pub fn join_verbs(
    _: Option<(ShmSegment, String)>,
    setup: VerbsSetup,
    _: &[Vec<u8>],
    _: Topology,
    _: Config,
) -> Result<Endpoint, Error> {
    match setup {}
}

/// The device and port this rank would use (`spec`: `DUALCOMM_IB_DEVICE`'s syntax), in words.
#[cfg(feature = "verbs")]
pub fn find_device(spec: Option<&str>) -> Result<String, Error> {
    dualcomm_core::transport::verbs::device::find(spec).map(|c| c.to_string())
}

#[cfg(not(feature = "verbs"))]
pub fn find_device(_: Option<&str>) -> Result<String, Error> {
    Err(built_without_verbs())
}

/// A build without the `verbs` feature opens no port: no value of this type exists.
#[cfg(not(feature = "verbs"))]
pub enum VerbsSetup {}

#[cfg(not(feature = "verbs"))]
impl VerbsSetup {
    pub fn card(&self) -> Vec<u8> {
        match *self {}
    }

    pub fn device(&self) -> String {
        match *self {}
    }
}

#[cfg(not(feature = "verbs"))]
pub fn open_verbs(_: &Topology, _: usize, _: &Config, _: bool) -> Result<VerbsSetup, Error> {
    Err(built_without_verbs())
}

/// Why a build without the `verbs` feature cannot run the verbs transport.
#[cfg(not(feature = "verbs"))]
fn built_without_verbs() -> Error {
    Error::TransportUnavailable {
        transport: "verbs".into(),
        reason: "this build of dualcomm has no verbs transport (built without the cargo \
                 feature `verbs`)"
            .into(),
    }
}
