// Guards for what ComfyUI does with web/: GET /extensions lists every .js under it and the frontend imports each
// one as an ES module. So every file there must import cleanly on its own, lib modules must not touch the page,
// and no test or tooling file may live there.
import test from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync, existsSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "../../web");

function jsFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? jsFiles(join(dir, e.name)) : e.name.endsWith(".js") ? [join(dir, e.name)] : [],
  );
}

function importsOf(file) {
  const src = readFileSync(file, "utf8");
  return [...src.matchAll(/^\s*import\s+(?:[^'"]*?\s+from\s+)?["']([^"']+)["']/gm)].map((m) => m[1]);
}

test("web/ holds the extension and its lib modules only, no tests", () => {
  const files = jsFiles(WEB).map((f) => relative(WEB, f).split("\\").join("/")).sort();
  assert.ok(files.includes("hadakron.js"), files.join(", "));
  assert.ok(files.filter((f) => f.startsWith("lib/")).length >= 5, files.join(", "));
  for (const f of files) assert.ok(!/test|spec/i.test(f), `test-like file ${f} would be loaded by the ComfyUI frontend`);
  for (const f of files) assert.ok(f === "hadakron.js" || f.startsWith("lib/"), `unexpected file web/${f}`);
});

test("lib modules import only each other, and every relative import exists", () => {
  for (const file of jsFiles(WEB)) {
    for (const spec of importsOf(file)) {
      assert.ok(spec.startsWith("."), `${relative(WEB, file)} imports a bare module ${spec}`);
      const target = resolve(dirname(file), spec);
      const inLib = relative(join(WEB, "lib"), file).startsWith("..") === false;
      if (inLib) {
        assert.ok(!relative(join(WEB, "lib"), target).startsWith(".."), `${relative(WEB, file)} reaches outside lib: ${spec}`);
      }
      if (!spec.includes("/scripts/")) assert.ok(existsSync(target), `${relative(WEB, file)}: ${spec} does not exist`);
    }
  }
  const main = importsOf(join(WEB, "hadakron.js"));
  assert.ok(main.includes("../../scripts/app.js") && main.includes("../../scripts/api.js"), main.join(", "));
});

test("every lib module imports on its own without a page (no window/document at load time)", async () => {
  for (const file of jsFiles(join(WEB, "lib"))) {
    const mod = await import(pathToFileURL(file).href);
    assert.ok(Object.keys(mod).length > 0, `${relative(WEB, file)} exports nothing`);
    assert.ok(!/\b(window|document|app|api)\./.test(readFileSync(file, "utf8")), `${relative(WEB, file)} touches the page`);
  }
});
