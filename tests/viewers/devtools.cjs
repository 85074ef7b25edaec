// Load a Chrome Trace Event JSON into Chromium's own trace engine (the DevTools Performance
// panel's model, models/trace/trace.js of the DevTools frontend bundled in Chromium), in
// headless Chromium driven by Playwright, and write what it parsed: per process and thread,
// the entries of its track and the tree the panel draws (each entry's depth).
//   node devtools.cjs TRACE_JSON OUTPUT_JSON
// Env: CHROMIUM, USER_DATA_DIR (a fresh directory), NODE_PATH (where playwright-core is).
const { launch } = require("./browser.cjs");
const fs = require("fs");

const [tracePath, outPath] = process.argv.slice(2);
(async () => {
  const context = await launch();
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(30000);
    // The frontend's own page: its modules import relative to it.
    await page.goto("devtools://devtools/bundled/devtools_app.html");
    const events = JSON.parse(fs.readFileSync(tracePath, "utf8")).traceEvents;
    const parsed = await page.evaluate(async (events) => {
      const Trace = await import("./models/trace/trace.js");
      const model = Trace.TraceModel.Model.createWithAllHandlers();
      await model.parse(events, { metadata: {}, isFreshRecording: false });
      const trace = model.parsedTrace(0);
      const data = trace.data || trace; // the shape changed across Chromium versions
      const entry = (e) => ({ name: e.name, ph: e.ph, ts: e.ts, dur: e.dur ?? null, args: e.args });
      const processes = [];
      for (const [pid, proc] of data.Renderer.processes) {
        const threads = [];
        for (const [tid, thread] of proc.threads) {
          const tree = [];
          const walk = (node, depth) => {
            tree.push({ ...entry(node.entry), depth });
            for (const child of node.children) walk(child, depth + 1);
          };
          for (const root of thread.tree ? thread.tree.roots : []) walk(root, 0);
          threads.push({ tid, name: thread.name, entries: thread.entries.map(entry), tree });
        }
        processes.push({ pid, name: proc.name ?? null, threads });
      }
      return processes;
    }, events);
    fs.writeFileSync(outPath, JSON.stringify(parsed));
  } finally {
    await context.close();
  }
})().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
