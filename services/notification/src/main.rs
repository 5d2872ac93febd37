//! Runs this service alone (one Deployment per service). Configuration comes from
//! `TESSERA_*` environment variables and the optional `TESSERA_CONFIG_FILE`.

fn main() -> anyhow::Result<()> {
    tessera_runtime::bin::service_main(
        tessera_notification::SERVICE,
        false,
        tessera_notification::run,
    )
}
