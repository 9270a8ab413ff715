//! WASI preview 2 components that export `wasi:cli/run`: linked once into a
//! `CommandPre`, run with the same metering and isolation as modules.

use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::net::{GuestNetwork, GuestSockets, GuestSocketsView};
use crate::{ContainerSpec, Error, Exit, Meter, Usage, WasmRuntime, metered_store, wasi_builder};

/// Per-store state of a component: WASI preview 2, its resources, the meter.
pub(crate) struct ComponentHost {
    ctx: WasiCtx,
    table: ResourceTable,
    meter: Meter,
    network: GuestNetwork,
    names: Option<std::sync::Arc<dyn wasmkube_runtime::NameLookup>>,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl GuestSockets for ComponentHost {
    fn guest_sockets(&mut self) -> GuestSocketsView<'_> {
        GuestSocketsView::new(
            &mut self.ctx,
            &mut self.table,
            &self.network,
            self.names.as_ref(),
        )
    }
}

/// A component linked against WASI, ready to instantiate many times.
#[derive(Clone)]
pub struct PreparedComponent {
    pre: CommandPre<ComponentHost>,
}

impl std::fmt::Debug for PreparedComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedComponent").finish_non_exhaustive()
    }
}

impl WasmRuntime {
    /// Links a component against WASI preview 2 once; it must export
    /// `wasi:cli/run` (a command).
    pub fn prepare_component(&self, component: &Component) -> Result<PreparedComponent, Error> {
        let pre = self
            .component_linker
            .instantiate_pre(component)
            .and_then(CommandPre::new)
            .map_err(|e| Error::InvalidModule(format!("{e:#}")))?;
        Ok(PreparedComponent { pre })
    }

    /// Runs a prepared command component to completion. `wasi:cli/run`
    /// returning an error is exit code 1, as `wasmtime run` reports it;
    /// `wasi:cli/exit` keeps its code.
    pub async fn run_component(
        &self,
        prepared: &PreparedComponent,
        spec: &ContainerSpec,
    ) -> Result<(Exit, Usage), Error> {
        let host = ComponentHost {
            ctx: wasi_builder(spec)?.build(),
            table: ResourceTable::new(),
            meter: self.meter(spec),
            network: spec.network.clone(),
            names: spec.names.clone(),
        };
        let mut store = metered_store(&self.engine, host, |h| &mut h.meter);
        let result = async {
            let command = prepared.pre.instantiate_async(&mut store).await?;
            let _live = spec.live.live_instance();
            store.data_mut().meter.start_slice();
            command.wasi_cli_run().call_run(&mut store).await
        }
        .await;
        let code = result.map(|r| if r.is_ok() { 0 } else { 1 });
        Ok(store.data_mut().meter.finish(code))
    }
}
