// Builds plugin.js into a component for the `plugin-core` world: node build.mjs OUTPUT.wasm
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const output = process.argv[2] || "js_policy.wasm";
const { component } = await componentize({
  sourcePath: fileURLToPath(new URL("plugin.js", import.meta.url)),
  witPath: fileURLToPath(new URL("../../wit", import.meta.url)),
  worldName: "plugin-core",
  // No clocks, random numbers, stdio or HTTP: the plugin decides from its inputs alone.
  disableFeatures: ["random", "stdio", "clocks", "http", "fetch-event"],
});
await writeFile(output, component);
