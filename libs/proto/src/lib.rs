//! Generated protobuf and gRPC code for the Tessera APIs (`proto/` at the repository root).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Encoded `FileDescriptorSet` of every Tessera proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));

pub mod common {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.common.v1.rs"));
    }
}
pub mod catalog {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.catalog.v1.rs"));
    }
}
pub mod eligibility {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.eligibility.v1.rs"));
    }
}
pub mod wallet {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.wallet.v1.rs"));
    }
}
pub mod scheduler {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.scheduler.v1.rs"));
    }
}
pub mod notification {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.notification.v1.rs"));
    }
}
pub mod ops {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.ops.v1.rs"));
    }
}
