//! Host-side bindings of the WIT package in `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: {
        default: async,
        // Fails closed: an increment that cannot be counted traps (see `host::kv`).
        "switchyard:plugin/kv.increment": async | trappable,
        // A plugin not granted `scanners` that reads them fails (see `host::scanners`).
        "switchyard:plugin/scanners.results": async | trappable,
    },
    exports: { default: async },
    with: {
        "switchyard:plugin/message.body": super::host::BodyHandle,
        "switchyard:plugin/types.session": super::host::SessionHandle,
    },
});

pub use switchyard::plugin::types;
