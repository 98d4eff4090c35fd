// Builds the agent console: bundles src/main.ts (with the generated stubs, Connect-Web
// and the offline map data) and copies the page and its style, into the folder Presence
// serves at /console/ (accessline_server/presence/console/, not kept in git).
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "accessline_server", "presence", "console");
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "linked",
  outfile: join(out, "app.js"),
  logLevel: "warning",
});
for (const file of ["index.html", "console.css"]) {
  copyFileSync(join(here, file), join(out, file));
}
console.log(`built the agent console into ${out}`);
